"""What a training run is: one pydantic model, loadable from YAML, every field a CLI override.

A run is fully described by this object (plus the data it points at), which is why it is stored
in each checkpoint: resuming with a different config would silently train something else, so
the trainer refuses it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator

from adapters.adapter import DEFAULT_TARGETS
from adapters.audio_layer import MAX_ENCODER_LAYERS, MAX_ENCODER_STRIDE, MAX_LOOKAHEAD, EncoderMerge

# settings added after runs were started: at these values they leave a run's fingerprint as it was
NEW_SETTING_DEFAULTS: dict[str, object] = {"audio_encoder_layers": 0, "audio_encoder_lr_scale": 0.1,
                                            "char_ctc_weight": 0.0, "char_ctc_layer": 2, "spec_freq_warp": 0.0,
                                            "char_ctc_merges": None, "val_sentences": 0,
                                            "lora_rank_layers": None, "audio_encoder_lookahead": 0,
                                            "audio_encoder_stride": 1, "audio_encoder_merge": "mean",
                                            "audio_distill_weight": 0.0, "audio_distill_layer": None}
DistillLoss = Literal["cosine", "mse", "none"]
Precision = Literal["fp32", "bf16"]


class TrainConfig(BaseModel):
    """Settings of one AuRA training run (paths are resolved relative to the YAML file)."""

    model_config = ConfigDict(extra="forbid")

    # --- models and data
    student: Path = Field(..., description="Local HF causal LM folder (Llama/Qwen2/Mistral).")
    teacher: Path = Field(..., description="Local HF Whisper folder; only its encoder is used.")
    manifest: Path = Field(..., description="JSONL: audio, task (transcribe|qa), text, [prompt], [response].")
    eval_manifest: Path | None = Field(None, description="Held-out JSONL for periodic evaluation loss.")
    output: Path = Field(..., description="Where the finished adapter directory is written.")
    work_dir: Path | None = Field(None, description="Checkpoints and logs; default <output>.work.")
    teacher_cache: Path | None = Field(None, description="Per-clip teacher targets; default <work_dir>/teacher_cache.")
    init_from: Path | None = Field(None, description="Start from an existing AuRA adapter instead of a fresh one.")

    # --- LoRA
    lora_rank: PositiveInt = 8
    lora_alpha: float = 16.0
    lora_targets: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS))
    lora_layers: list[int] | None = Field(None, description="Student layers that get LoRA; None = all.")
    lora_rank_layers: dict[int, PositiveInt] | None = Field(
        None, description="Block -> LoRA rank for those blocks (the others: lora_rank), e.g. '0:128,1:128,2:128': more "
        "capacity where the student must become an acoustic encoder (the distilled blocks, the character head's), little "
        "in the read-out above. Their alpha is lora_alpha x sqrt(rank / lora_rank), so their updates start as large as "
        "the other blocks' (rsLoRA's rule). Served through PEFT's rank_pattern / alpha_pattern; the server's "
        "--max-lora-rank must cover the largest.")

    # --- audio layer
    stack_factor: int = Field(4, ge=1, le=32)
    conv_channels: int | None = Field(None, description="Default: the teacher's width, so its stem can initialise ours.")
    audio_encoder_layers: int = Field(
        0, ge=0, le=MAX_ENCODER_LAYERS, description="Transformer blocks in the audio layer (causal unless "
        "audio_encoder_lookahead), initialised from the teacher's first blocks (needs conv_channels = the teacher's "
        "width). 0 = the conv stem alone.")
    audio_encoder_stride: int = Field(
        1, ge=1, le=MAX_ENCODER_STRIDE, description="Stem frames averaged into one before those blocks (1 = Whisper's "
        "20 ms frames). Two blocks at stride 1 are 9.2% of a 10 s request's FLOPs, past the 5% budget; stride s divides "
        "their cost by ~s (python -m bench.audio_layer_cost --encoder-stride). The stacking then takes stack_factor "
        "block frames, so keep stride x stack_factor at 4 for the usual 12.5 tokens per second.")
    audio_encoder_merge: EncoderMerge = Field(
        "mean", description="How audio_encoder_stride stem frames become one: 'mean' averages them (and forgets their "
        "order); 'linear' maps them side by side through a learned matrix that starts as the mean and learns at the full "
        "lr. Needs audio_encoder_stride > 1.")
    audio_encoder_lookahead: int = Field(
        0, ge=0, le=MAX_LOOKAHEAD, description="Block frames (20 ms x audio_encoder_stride each) those blocks may "
        "attend ahead; 0 = causal. Run "
        "causally, Whisper's blocks keep little of what they hold (bench/probe_lookahead.py). No request waits for it "
        "(a clip's vectors are computed once it is whole); realtime prefill re-sends the last blocks x k block frames' positions.")
    audio_encoder_lr_scale: float = Field(
        0.1, ge=0.0, le=1.0, description="Those blocks learn at lr x this (0 freezes them): at the LoRA's learning rate "
        "the pretrained blocks were wrecked within 100 steps (distillation stuck at 0.98 where the stem alone reached 0.76).")

    # --- distillation
    layer_map: dict[int, int] | None = Field(
        None, description="student layer -> teacher layer (0-based outputs of each block). "
        "Default: teacher layers spread over the student's first third.")
    distill_loss: DistillLoss = "cosine"
    distill_weight: float = Field(1.0, ge=0.0)
    distill_targets: Literal["raw", "centered"] = Field(
        "raw", description="centered: subtract each position's corpus mean from the teacher targets and divide by "
        "each channel's spread, so the loss is about what was said (Whisper's positions explain 16-64% of its early "
        "blocks' variance, and a student that only counts positions gets cosine distance ~0.1 on raw targets).")
    distill_stats_clips: PositiveInt = Field(256, description="Training clips (a seeded sample) the centering statistics come from.")
    audio_distill_weight: float = Field(
        0.0, ge=0.0, description="Distil the teacher's deeper states into the audio layer itself: its frames before the "
        "stacking (the blocks' output; 20 ms x audio_encoder_stride each) through a training-only head (RMSNorm + "
        "Linear, dropped at export) against teacher block audio_distill_layer, run on the whole clip and pooled to the "
        "same frames, with the distill_loss and distill_targets of the LLM's layers. Why: a strided block with a short "
        "lookahead keeps less than Whisper's deeper blocks hold (bench/probe_lookahead.py), and the LLM-side losses "
        "reach the audio layer only through the frozen LLM; this aims it at them directly (0 = off).")
    audio_distill_layer: int | None = Field(
        None, ge=0, description="Teacher block (0-based output) the audio layer's frames are distilled towards; "
        "None = the teacher's last block.")
    teacher_context_frames: int | None = Field(
        None, ge=100, le=3000, description="Run the teacher on each clip padded to a multiple of this many mel frames "
        "(its position table cut to match) instead of Whisper's full 30 s: several times cheaper targets; None = 30 s.")

    # --- stage and alignment
    max_layer: int | None = Field(
        None, ge=0, description="Run only LLM blocks 0..max_layer (a cheap first stage: the distillation and CTC "
        "losses need nothing above the deepest distilled block). The next-token loss is off in such a stage.")
    ctc_weight: float = Field(0.0, ge=0.0, description="CTC over the LLM vocabulary at the audio positions (0 = off).")
    ctc_layer: int | None = Field(None, ge=0, description="Block whose output feeds the CTC head (final norm + LM head); "
                                  "default: max_layer, else the deepest distilled block.")
    char_ctc_weight: float = Field(
        0.0, ge=0.0, description="CTC over characters at the audio positions of block char_ctc_layer, through a small "
        "training-only head (RMSNorm + Linear, dropped at export): a dense spelling signal for the early blocks, where "
        "linear probes found the words missing (0 = off).")
    char_ctc_layer: int = Field(2, ge=0, description="Block whose output feeds the character CTC head.")
    char_ctc_merges: int | None = Field(
        None, ge=0, le=100_000, description="What the character head spells in: None = characters; N = pieces of the "
        "student's own BPE with only its first N merges (~N + 256 classes, each one of the LLM's tokens), a small "
        "sub-word inventory the LLM reads as its own (bench/OPEN_VOCAB_LOG.md, stop 26).")
    ce_weight: float = Field(1.0, ge=0.0, description="Weight of the next-token loss on answer tokens.")
    text_kd_weight: float = Field(
        0.0, ge=0.0, description="KL from the base LLM reading the transcript as text (in place of the audio, LoRA off) "
        "to the student hearing it, over the answer tokens (DiVA-style): ties the audio path to how the LLM reads the "
        "same words, a signal the next-token loss on one target sequence gives only sparsely. Full student only.")
    tasks: list[Literal["transcribe", "qa"]] = Field(
        default_factory=lambda: ["transcribe", "qa"], description="Manifest tasks trained on (a curriculum: transcribe first).")

    # --- SpecAugment (student input only; masks drawn per step, teacher targets stay clean)
    spec_time_masks: int = Field(0, ge=0, le=20, description="Time masks per clip and step (0 = off).")
    spec_time_width: float = Field(0.05, gt=0.0, le=0.5, description="Largest time mask, as a share of the clip's frames.")
    spec_freq_masks: int = Field(0, ge=0, le=10, description="Frequency masks per clip and step (0 = off).")
    spec_freq_width: int = Field(10, ge=1, le=64, description="Largest frequency mask, in mel bins.")
    spec_freq_warp: float = Field(0.0, ge=0.0, le=0.3, description="Vocal tract length perturbation: scale the clip's "
                                  "frequencies by a factor drawn from [1 - w, 1 + w] per clip and step (0 = off).")

    # --- targets
    transcribe_prompt: str = "Transcribe the audio."
    max_response_tokens: PositiveInt = 64

    # --- optimisation
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_steps: int = Field(20, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    grad_clip: float = Field(1.0, gt=0.0)
    steps: PositiveInt = 500
    time_budget_s: float | None = Field(
        None, gt=0, description="Stop after this much training wall time (all sittings together), save and export: for "
        "leased or preemptible machines. The LR schedule then follows whichever of steps and time runs out first, so such "
        "a run is not bit-reproducible.")
    batch_size: PositiveInt = 8
    grad_accum: PositiveInt = Field(1, description="Micro-batches per step (batch_size is split); same update, less memory.")
    precision: Precision = "fp32"
    device: str = Field("auto", description="auto = cuda if present, else cpu.")
    threads: int | None = Field(None, description="torch CPU threads (None = torch default).")
    prefetch: bool = Field(True, description="Read the next batch's clips and cached teacher targets on a worker thread "
                           "while the current step runs (same data, same result; a GPU otherwise waits on the disk).")
    seed: int = 0

    # --- bookkeeping
    log_every: PositiveInt = 10
    eval_every: int = Field(100, ge=0, description="0 disables periodic evaluation.")
    eval_examples: PositiveInt = 32
    val_sentences: int = Field(0, ge=0, description="Distinct training sentences held back from training, with every row "
                               "that speaks them, to choose the exported step: the adapter is the evaluated step with the "
                               "lowest validation next-token loss (the total loss in a stage without it), not the last. "
                               "0 = export the last step. The held-out set (eval_manifest) never chooses: it is what the "
                               "adapter is measured on.")
    fit_examples: int = Field(0, ge=0, description="Training examples (a fixed sample drawn with the seed) whose loss "
                              "terms are logged at every evaluation as fit_<term>, beside eval_ and val_: a read-out that "
                              "learns its sentences by heart shows fit_ce_transcribe far below val_, one that under-fits "
                              "shows them level (gpu_v3 and gpu_v4 needed bench/audio_use.py after the lease to tell).")
    wer_every: int = Field(0, ge=0, description="Held-out WER every N steps (greedy decoding, or best-path CTC in a "
                           "truncated stage); 0 = only eval losses.")
    wer_examples: PositiveInt = 24
    save_every: int = Field(100, ge=0, description="Checkpoint interval in steps; 0 = only at the end.")
    keep_checkpoints: PositiveInt = 2
    resume: bool = Field(True, description="Continue from the newest checkpoint in work_dir if there is one.")
    progress: bool = Field(True, description="tqdm progress bar on stderr.")

    @field_validator("layer_map", "lora_rank_layers", mode="before")
    @classmethod
    def _parse_layer_map(cls, value: Any) -> Any:
        """Accept {s: t}, [[s, t], ...] or "s:t,s:t" (the CLI form)."""
        if value is None or isinstance(value, dict):
            return value
        if isinstance(value, str):
            pairs = [p.split(":") for p in value.replace(" ", "").split(",") if p]
            return {int(s): int(t) for s, t in pairs}
        return {int(s): int(t) for s, t in value}

    @field_validator("lora_targets", mode="before")
    @classmethod
    def _split_targets(cls, value: Any) -> Any:
        return value.split(",") if isinstance(value, str) else value

    @field_validator("tasks", mode="before")
    @classmethod
    def _split_tasks(cls, value: Any) -> Any:
        return value.split(",") if isinstance(value, str) else value

    @field_validator("lora_layers", mode="before")
    @classmethod
    def _split_layers(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [int(v) for v in value.split(",") if v]
        return value

    @property
    def resolved_work_dir(self) -> Path:
        return self.work_dir or self.output.with_name(self.output.name + ".work")

    @property
    def resolved_teacher_cache(self) -> Path:
        return self.teacher_cache or self.resolved_work_dir / "teacher_cache"

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def fingerprint(self) -> str:
        """Hash of the settings that change the optimisation trajectory (not bookkeeping like
        log_every). Paths are left out: the trainer adds the identity of what they hold (its run
        fingerprint), so a run moved to another machine or folder still resumes."""
        skip = {"log_every", "eval_every", "eval_examples", "fit_examples", "save_every", "keep_checkpoints", "resume",
                "progress", "threads", "prefetch", "output", "work_dir", "teacher_cache", "steps", "time_budget_s", "wer_every", "wer_examples",
                "eval_manifest", "student", "teacher", "manifest", "init_from"}
        data = {k: v for k, v in json.loads(self.model_dump_json()).items() if k not in skip}
        for key, default in NEW_SETTING_DEFAULTS.items():  # runs started before a setting existed still resume
            if data.get(key) == default:
                data.pop(key)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def load_train_config(path: Path | None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """YAML (relative paths resolved against its folder) + overrides (relative to the cwd)."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"training config {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of settings at the top level")
        base = path.resolve().parent
        for key in ("student", "teacher", "manifest", "eval_manifest", "output", "work_dir", "teacher_cache", "init_from"):
            if loaded.get(key) is not None and not Path(loaded[key]).expanduser().is_absolute():
                loaded[key] = str(base / Path(loaded[key]).expanduser())
        data.update(loaded)
    for key, value in (overrides or {}).items():
        if value is not None:
            data[key] = value
    return TrainConfig.model_validate(data)


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """``--config`` and one flag per ``TrainConfig`` field: ``aura train``, the DDP entry point and the
    bench diagnostics that run the trainer take the same flags, generated from the settings object."""
    parser.add_argument("--config", help="YAML file with TrainConfig fields")
    for name, info in TrainConfig.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_ = (info.description or "").replace("%", "%%")  # argparse %-formats help text
        if info.annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            parser.add_argument(flag, dest=name, default=None, metavar=name.upper(), help=help_)


def config_from_flags(args: argparse.Namespace, defaults: dict[str, Any] | None = None) -> TrainConfig:
    """The YAML of ``--config``, then the flags given; ``defaults`` fill the fields that neither sets."""
    flags = {k: getattr(args, k) for k in TrainConfig.model_fields if getattr(args, k, None) is not None}
    path = Path(args.config) if getattr(args, "config", None) else None
    if defaults:
        given = set(flags) | _yaml_keys(path)
        flags = {**{k: v for k, v in defaults.items() if k not in given}, **flags}
    return load_train_config(path, flags)


def _yaml_keys(path: Path | None) -> set[str]:
    """The fields a YAML config sets (a missing or malformed file is load_train_config's to report)."""
    if path is None or not Path(path).is_file():
        return set()
    loaded = yaml.safe_load(Path(path).read_text()) or {}
    return set(loaded) if isinstance(loaded, dict) else set()
