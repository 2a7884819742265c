"""The AuRA training loop: setup checks, teacher targets, steps, checkpoints, resume, export.

Only the LoRA, the audio layer and the distillation heads have gradients; the base LLM and the
teacher are frozen. Everything that decides the trajectory is derived from the config and the
step number (the data order included), so a run resumed from a checkpoint continues exactly as
if it had never stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import random
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from adapters.adapter import AuraConfig, base_model_ref, load_adapter, new_lora_config, save_adapter, sha256_file
from adapters.audio import load_audio_file
from adapters.audio_layer import AudioEmbedding, AudioLayerConfig, embedding_rms, pooled_frames
from adapters.base_model import BaseModelInfo, read_base_model
from adapters.features import FeatureConfig
from adapters.prompt import PromptLayout, end_of_turn_id
from adapters.training.config import TrainConfig
from adapters.training.data import Batch, Example, ManifestRow, build_example, collate, read_manifest, with_features, with_features_batch
from adapters.training.ctc import CHAR_SLOTS, CHAR_UNITS, Units, ctc_loss, greedy_ctc, piece_units
from adapters.training.losses import distill_loss, next_token_loss, text_kd_loss
from adapters.training.spec_augment import SpecAugment, mask_seed
from adapters.training.student import AuraStudent, CharHead, DistillHead
from adapters.training.teacher import (
    TargetStats, TeacherCache, TeacherInfo, load_teacher_encoder, teacher_info, teacher_targets,
)

log = logging.getLogger(__name__)
CHECKPOINT_GLOB = "ckpt-*.pt"
BEST_FILE = "best.pt"  # the trainable weights of the step with the lowest validation loss (val_sentences)
# corpora up to this many rows keep their log-mels in memory; larger ones recompute them per batch
# from the clips (bounded memory; the clips are what the prefetch thread reads ahead)
FEATURES_IN_MEMORY_MAX_ROWS = 2000
LOSS_TERMS = ("loss", "ce", "text_kd", "distill", "audio_distill", "ctc", "char_ctc")  # what progress, logs and the adapter's provenance report


class ConfigError(ValueError):
    """A training config that cannot work; raised before any model is loaded."""


def default_layer_map(student_layers: int, teacher_layers: int) -> dict[int, int]:
    """Every teacher block, spread evenly over the student's first third (at least one block each).

    The early LLM layers are where VoRA-style alignment pays: later layers are left to the
    next-token loss, which must turn the audio into answers.
    """
    span = max(teacher_layers, student_layers // 3)
    span = min(span, student_layers)
    mapping: dict[int, int] = {}
    for t in range(teacher_layers):
        s = min(student_layers - 1, ((t + 1) * span) // teacher_layers - 1)
        mapping[max(s, 0)] = t
    return mapping


@dataclass(frozen=True)
class TargetSpec:
    """Which teacher states a run distills, and how many stem frames (20 ms) each target pools: the LLM's layers read
    one target per audio token (``frames_per_token``), the audio layer's frames one per block frame (the stride)."""

    name: str
    layers: tuple[int, ...]
    frames: int

    def count(self, e: Example) -> int:
        """Targets of one clip: as many as the audio layer makes of it at this pooling."""
        return pooled_frames(e.num_frames, self.frames)


TargetMemo = dict[int, dict[str, torch.Tensor]]  # example index -> TargetSpec.name -> its (n_layers, n, width) targets


@dataclass
class Setup:
    """What the config resolves to once the model folders have been read (no weights loaded)."""

    base: BaseModelInfo
    teacher: TeacherInfo
    layer_map: dict[int, int]
    audio_cfg: AudioLayerConfig
    features: FeatureConfig
    layout: PromptLayout
    rows: list[ManifestRow]
    eval_rows: list[ManifestRow] = field(default_factory=list)
    val_rows: list[ManifestRow] = field(default_factory=list)


def split_validation(rows: list[ManifestRow], n_sentences: int, seed: int) -> tuple[list[ManifestRow], list[ManifestRow]]:
    """(training rows, validation rows): ``n_sentences`` distinct sentences, drawn with ``seed``, leave training with
    every row that speaks them (a question's qa row and its transcription row go together), so validation measures
    sentences the run never trained on, as the held-out set does, while the held-out set itself never chooses."""
    if n_sentences == 0:
        return rows, []
    texts = sorted({r.text for r in rows})
    if n_sentences >= len(texts):
        raise ConfigError(f"val_sentences={n_sentences}: the manifest has {len(texts)} distinct sentences; hold back fewer")
    held = set(random.Random(f"{seed}:val").sample(texts, n_sentences))
    return [r for r in rows if r.text not in held], [r for r in rows if r.text in held]


def check_config(config: TrainConfig) -> Setup:
    """Fail early, with a message that says what to change, on anything that cannot work."""
    try:
        base = read_base_model(config.student)
    except FileNotFoundError as e:
        raise ConfigError(f"student: {e}") from e
    teacher = teacher_info(config.teacher)
    layer_map = config.layer_map if config.layer_map is not None else default_layer_map(base.num_hidden_layers, teacher.num_layers)
    if config.distill_loss != "none" and config.distill_weight > 0 and not layer_map:
        raise ConfigError("layer_map is empty; map at least one student layer to a teacher layer, or set distill_loss: none")
    for s, t in layer_map.items():
        if not 0 <= s < base.num_hidden_layers:
            raise ConfigError(f"layer_map: student layer {s} is out of range (the student has layers 0..{base.num_hidden_layers - 1})")
        if not 0 <= t < teacher.num_layers:
            raise ConfigError(f"layer_map: teacher layer {t} is out of range (the teacher has layers 0..{teacher.num_layers - 1})")
    deepest = max(layer_map) if layer_map and config.distill_loss != "none" and config.distill_weight > 0 else None
    if config.max_layer is not None:
        if config.max_layer >= base.num_hidden_layers:
            raise ConfigError(f"max_layer {config.max_layer} is out of range (the student has layers 0..{base.num_hidden_layers - 1})")
        if deepest is not None and deepest > config.max_layer:
            raise ConfigError(f"max_layer {config.max_layer} cuts off distilled layer {deepest}; raise max_layer or change layer_map")
    def runs(layer: int) -> bool:
        """A student block that this stage runs (a head can read it)."""
        return 0 <= layer < base.num_hidden_layers and (config.max_layer is None or layer <= config.max_layer)

    ctc_layer = ctc_layer_of(config, deepest)
    if config.ctc_weight > 0:
        if ctc_layer is None:
            raise ConfigError("ctc_weight > 0 needs ctc_layer (or max_layer, or a distilled layer to read from)")
        if not runs(ctc_layer):
            raise ConfigError(f"ctc_layer {ctc_layer} must be a student layer at or below max_layer")
    if config.char_ctc_weight > 0 and not runs(config.char_ctc_layer):
        raise ConfigError(f"char_ctc_layer {config.char_ctc_layer} must be a student layer at or below max_layer")
    if config.max_layer is not None and config.text_kd_weight > 0:
        raise ConfigError("text_kd_weight needs the full student (its answer logits); it cannot run in a truncated stage (max_layer)")
    if config.char_ctc_merges is not None and config.char_ctc_weight == 0:
        raise ConfigError("char_ctc_merges sets what the character head spells in; it needs char_ctc_weight > 0")
    if config.char_ctc_merges is not None and not (Path(config.student) / "tokenizer.json").is_file():
        raise ConfigError(f"char_ctc_merges needs the student's BPE tokenizer.json, not found in {config.student}")
    if config.audio_distill_weight > 0:
        if config.distill_loss == "none":
            raise ConfigError("audio_distill_weight uses distill_loss (cosine or mse) on the audio layer's frames; "
                              "distill_loss: none turns it off too")
        if config.audio_distill_layer is not None and config.audio_distill_layer >= teacher.num_layers:
            raise ConfigError(f"audio_distill_layer {config.audio_distill_layer} is out of range (the teacher has layers "
                              f"0..{teacher.num_layers - 1})")
    elif config.audio_distill_layer is not None:
        raise ConfigError("audio_distill_layer chooses the audio layer's target; it needs audio_distill_weight > 0")
    if (config.max_layer is not None and config.ctc_weight == 0 and config.char_ctc_weight == 0 and deepest is None
            and config.audio_distill_weight == 0):
        raise ConfigError("a truncated stage (max_layer) trains nothing without distillation, ctc_weight, "
                          "char_ctc_weight or audio_distill_weight > 0")
    if config.batch_size % config.grad_accum:
        raise ConfigError(f"batch_size {config.batch_size} is not a multiple of grad_accum {config.grad_accum}")
    if config.lora_layers is not None:
        bad = [i for i in config.lora_layers if not 0 <= i < base.num_hidden_layers]
        if bad:
            raise ConfigError(f"lora_layers {bad} are out of range (the student has layers 0..{base.num_hidden_layers - 1})")
    if config.lora_rank_layers:
        bad = [i for i in config.lora_rank_layers if not 0 <= i < base.num_hidden_layers]
        if bad:
            raise ConfigError(f"lora_rank_layers: blocks {bad} are out of range (the student has layers 0..{base.num_hidden_layers - 1})")
        if config.lora_layers is not None and (skipped := sorted(set(config.lora_rank_layers) - set(config.lora_layers))):
            raise ConfigError(f"lora_rank_layers: blocks {skipped} get no LoRA (lora_layers leaves them out)")
        if config.init_from is not None:
            raise ConfigError("lora_rank_layers shapes a fresh LoRA; with init_from the adapter's own ranks are kept")
    missing = [t for t in config.lora_targets if t not in base.linear_modules]
    if missing:
        raise ConfigError(f"lora_targets {missing} are not linear modules of the student (it has {list(base.linear_modules)})")

    features = FeatureConfig(n_mels=teacher.n_mels)
    layout = PromptLayout()
    if config.audio_encoder_lookahead and (not config.audio_encoder_layers or config.init_from is not None):
        raise ConfigError("audio_encoder_lookahead sets how far a fresh audio layer's blocks see ahead: it needs "
                          "audio_encoder_layers > 0, and with init_from the adapter's audio layer keeps its own")
    if config.audio_encoder_stride > 1 and (not config.audio_encoder_layers or config.init_from is not None):
        raise ConfigError("audio_encoder_stride pools a fresh audio layer's frames for its blocks: it needs "
                          "audio_encoder_layers > 0, and with init_from the adapter's audio layer keeps its own")
    if config.audio_encoder_merge != "mean" and (config.audio_encoder_stride == 1 or config.init_from is not None):
        raise ConfigError(f"audio_encoder_merge={config.audio_encoder_merge!r} merges a fresh audio layer's "
                          "audio_encoder_stride frames into one: it needs audio_encoder_stride > 1, and with init_from "
                          "the adapter's audio layer keeps its own")
    if config.audio_encoder_layers:
        if config.audio_encoder_layers > teacher.num_layers:
            raise ConfigError(f"audio_encoder_layers={config.audio_encoder_layers} but the teacher has only "
                              f"{teacher.num_layers} blocks to initialise them from")
        if (config.conv_channels or teacher.width) != teacher.width:
            raise ConfigError(f"audio_encoder_layers needs conv_channels = the teacher's width ({teacher.width}); "
                              f"it is {config.conv_channels}")
    audio_cfg = AudioLayerConfig(n_mels=features.n_mels, conv_channels=config.conv_channels or teacher.width,
                                 stack_factor=config.stack_factor, hidden_size=base.hidden_size,
                                 encoder_layers=config.audio_encoder_layers, encoder_heads=teacher.heads,
                                 encoder_ffn_dim=teacher.ffn_dim if config.audio_encoder_layers else None,
                                 encoder_lookahead=config.audio_encoder_lookahead,
                                 encoder_stride=config.audio_encoder_stride,
                                 encoder_merge=config.audio_encoder_merge)
    if config.init_from is not None:
        init = AuraConfig.model_validate_json((Path(config.init_from) / "aura_config.json").read_text())
        if init.audio_layer.hidden_size != base.hidden_size or init.base_model.hidden_size != base.hidden_size:
            raise ConfigError(
                f"init_from {config.init_from}: hidden size mismatch: the adapter was built for hidden size "
                f"{init.audio_layer.hidden_size}, the student has {base.hidden_size}")
        if init.base_model.fingerprint != base.fingerprint:
            raise ConfigError(f"init_from {config.init_from}: built for another base model ({init.base_model.name})")
        features, layout, audio_cfg = init.features, init.prompt, init.audio_layer
        if config.audio_encoder_layers and config.audio_encoder_layers != audio_cfg.encoder_layers:
            raise ConfigError(f"audio_encoder_layers={config.audio_encoder_layers} but init_from {config.init_from} "
                              f"has {audio_cfg.encoder_layers}; an adapter's audio layer cannot change shape")
        if features.n_mels != teacher.n_mels:
            raise ConfigError(f"init_from: the adapter uses {features.n_mels} mel bins, the teacher {teacher.n_mels}")
    if audio_cfg.hidden_size != base.hidden_size:
        raise ConfigError(f"hidden size mismatch: audio layer {audio_cfg.hidden_size} vs student {base.hidden_size}")

    rows = [r for r in read_manifest(config.manifest) if r.task in config.tasks]
    if not rows:
        raise ConfigError(f"{config.manifest} has no rows of the tasks {config.tasks}")
    for i, r in enumerate(rows, 1):
        if r.task == "qa" and r.response is None:
            raise ConfigError(f"{config.manifest}:{i}: qa row has no 'response'; run `aura data responses --manifest {config.manifest}` first")
    eval_rows = read_manifest(config.eval_manifest) if config.eval_manifest else []
    # held-out rows of the tasks this stage trains; qa rows still waiting for a response are skipped
    skipped = sum(1 for r in eval_rows if r.task == "qa" and r.response is None and "qa" in config.tasks)
    eval_rows = [r for r in eval_rows if r.task in config.tasks and (r.task != "qa" or r.response is not None)]
    if skipped:
        log.warning("%s: %d qa rows have no response yet and are left out of evaluation", config.eval_manifest, skipped)
    rows, val_rows = split_validation(rows, config.val_sentences, config.seed)
    return Setup(base, teacher, dict(sorted(layer_map.items())), audio_cfg, features, layout, rows, eval_rows, val_rows)


def ctc_layer_of(config: TrainConfig, deepest_distilled: int | None) -> int | None:
    """The block the CTC head reads: explicit, else the truncated stage's top, else the deepest distilled."""
    if config.ctc_layer is not None:
        return config.ctc_layer
    return config.max_layer if config.max_layer is not None else deepest_distilled


@dataclass
class BatchReads:
    """What one training batch reads from disk, read ahead on a worker thread (``TrainConfig.prefetch``)."""

    step: int
    samples: dict[Path, np.ndarray]  # clip path -> samples (clips whose features are not kept in memory)
    targets: TargetMemo  # cached teacher targets (misses are computed in the step)


class DataOrder:
    """Shuffled epochs derived from (seed, epoch) only: the batch of step s is a pure function of s."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g).tolist()}
        return self._perms[epoch]

    def batch(self, step: int) -> list[int]:
        out = []
        for j in range(self.batch_size):
            g = step * self.batch_size + j
            out.append(self._perm(g // self.n)[g % self.n])
        return out


def lr_at(step: int, config: TrainConfig, elapsed_s: float = 0.0) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio * lr`` over the steps, or over the time
    budget if that runs out first (so a run cut by its budget still ends at the low learning rate)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    if config.time_budget_s:
        progress = max(progress, min(1.0, elapsed_s / config.time_budget_s))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class TrainResult:
    output: Path
    steps: int
    final: dict[str, float]
    eval: dict[str, float] | None
    steps_per_s: float


class Trainer:
    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.setup = check_config(config)
        self._run_fingerprint: str | None = None
        self.device = torch.device(config.resolved_device())
        if config.threads:
            torch.set_num_threads(config.threads)
        self.work_dir = config.resolved_work_dir
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.distill = config.distill_loss != "none" and config.distill_weight > 0
        self.audio_distill = config.audio_distill_weight > 0
        self.history: list[dict[str, Any]] = []
        self._build()

    # ----------------------------------------------------------------- setup
    def _build(self) -> None:
        from peft import PeftModel, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        c, s = self.config, self.setup
        torch.manual_seed(c.seed)
        self.tokenizer = AutoTokenizer.from_pretrained(str(c.student))
        base = AutoModelForCausalLM.from_pretrained(str(c.student), dtype=torch.float32)
        base.requires_grad_(False)
        self.teacher_encoder = load_teacher_encoder(c.teacher, self.device)
        if c.init_from is not None:
            peft_model = PeftModel.from_pretrained(base, str(c.init_from), is_trainable=True)
            audio = load_adapter(c.init_from).audio_layer.float().requires_grad_(True).train()
        else:
            lora_cfg = new_lora_config(s.base, rank=c.lora_rank, alpha=c.lora_alpha,
                                       target_modules=tuple(c.lora_targets), layers=c.lora_layers,
                                       rank_layers=c.lora_rank_layers)
            peft_model = get_peft_model(base, lora_cfg)
            audio = AudioEmbedding(s.audio_cfg)
            conv1, conv2 = self.teacher_encoder.conv1, self.teacher_encoder.conv2
            if conv1.weight.shape == audio.conv1.weight.shape and conv2.weight.shape == audio.conv2.weight.shape:
                audio.init_from_whisper(self.teacher_encoder)
                self.stem_init = "teacher"
            else:
                log.warning("audio stem shapes differ from the teacher's; the stem starts random")
                self.stem_init = "random"
            audio.match_output_scale(embedding_rms(base))
        heads = {k: DistillHead(s.base.hidden_size, s.teacher.width) for k in s.layer_map} if self.distill else {}
        self.units: Units = CHAR_UNITS if c.char_ctc_merges is None else piece_units(c.student, c.char_ctc_merges)
        char_head = CharHead(s.base.hidden_size, self.units.size) if c.char_ctc_weight > 0 else None
        audio_head = DistillHead(audio.config.conv_channels, s.teacher.width) if self.audio_distill else None
        self.student = AuraStudent(peft_model, audio, heads, char_head, audio_head).to(self.device)
        self.student.train()
        self.rebuild_optimizer()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.end_of_turn = end_of_turn_id(self.tokenizer)
        self.blank_id = self.end_of_turn  # CTC blank: a token no transcript contains
        self.use_ce = c.max_layer is None and c.ce_weight > 0
        self.text_kd = c.max_layer is None and c.text_kd_weight > 0
        self.spec_augment = SpecAugment(c.spec_time_masks, c.spec_time_width, c.spec_freq_masks, c.spec_freq_width,
                                        c.spec_freq_warp, s.features)

        self.examples = self._examples(s.rows, c.manifest)
        self.eval_examples = self._examples(s.eval_rows[: c.eval_examples], c.eval_manifest) if s.eval_rows else []
        self.val_examples = self._examples(s.val_rows, c.manifest) if s.val_rows else []
        # a fixed sample of what it trains on, measured as the held-out rows are (fit_examples): fit against val is
        # memorising against under-fitting
        fit = sorted(random.Random(c.seed).sample(range(len(self.examples)), min(c.fit_examples, len(self.examples))))
        self.fit_examples = [self.examples[i] for i in fit]
        self.best: dict[str, Any] | None = None  # {"step", "metric", "value"} of the weights in BEST_FILE
        self.teacher_layers = [s.layer_map[k] for k in sorted(s.layer_map)]
        audio_cfg = self.student.audio_layer.config
        self.token_spec = TargetSpec("tokens", tuple(self.teacher_layers), audio_cfg.frames_per_token)
        last = s.teacher.num_layers - 1
        self.frame_spec = TargetSpec("frames", (last if c.audio_distill_layer is None else c.audio_distill_layer,),
                                     audio_cfg.encoder_stride)
        self.specs = [spec for spec, on in ((self.token_spec, self.distill), (self.frame_spec, self.audio_distill)) if on]
        self.ctc_layer = ctc_layer_of(c, max(s.layer_map) if self.distill and s.layer_map else None) if c.ctc_weight > 0 else None
        self.char_layer = c.char_ctc_layer if c.char_ctc_weight > 0 else None
        # teacher targets are computed when a clip is first used (and cached on disk): a large
        # corpus starts training at once instead of after hours of teacher passes
        self.targets: TargetMemo = {}
        self.eval_targets: TargetMemo = {}
        self.val_targets: TargetMemo = {}
        self.fit_targets: TargetMemo = {}
        self.order = DataOrder(len(self.examples), c.batch_size, c.seed)
        self.target_stats = {spec.name: self._target_stats(spec) for spec in self.specs} if c.distill_targets == "centered" else {}
        self.elapsed_s = 0.0
        # one batch ahead: the reads of step s+1 overlap step s (the order is a pure function of the step)
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="aura-prefetch") if c.prefetch else None
        self._ahead: Future[BatchReads] | None = None

    def rebuild_optimizer(self) -> None:
        """A fresh optimizer over the student's trainable parameters, as they are now.

        ``_build`` calls it once; a diagnostic that swaps a part of the student before the first
        step (``bench/oracle_readout.py`` puts the teacher in the audio layer's place) calls it
        again, so the optimizer and the gradient clipping see exactly the parameters that train."""
        c = self.config
        self.params = [p for p in self.student.parameters() if p.requires_grad]
        # the audio layer's pretrained blocks learn slower than the fresh parameters (``lr_scale``)
        blocks = getattr(self.student.audio_layer, "blocks", None)
        pretrained = {id(p) for p in blocks.parameters()} if isinstance(blocks, torch.nn.Module) else set()
        groups = [{"params": [p for p in self.params if id(p) not in pretrained], "lr_scale": 1.0}]
        if pretrained:
            groups.append({"params": [p for p in self.params if id(p) in pretrained], "lr_scale": c.audio_encoder_lr_scale})
        self.optimizer = torch.optim.AdamW(groups, lr=c.lr, weight_decay=c.weight_decay)

    def _target_stats(self, spec: TargetSpec) -> TargetStats:
        """Centering statistics from a seeded sample of training clips (their targets are cached, so a
        resumed run recomputes exactly the same statistics)."""
        c = self.config
        g = torch.Generator().manual_seed(c.seed)
        sample = torch.randperm(len(self.examples), generator=g)[: c.distill_stats_clips].tolist()
        return TargetStats.estimate(self.teacher_targets_for(self.examples, "centering statistics", sample, {}, spec))

    def _examples(self, rows: list[ManifestRow], manifest: Path | None) -> list[Example]:
        assert manifest is not None
        s, c = self.setup, self.config
        it = tqdm(rows, desc="loading clips", file=sys.stderr, disable=not c.progress or len(rows) < 50, leave=False)
        keep = len(rows) <= FEATURES_IN_MEMORY_MAX_ROWS
        return [build_example(i, r, Path(manifest).parent, tokenizer=self.tokenizer, layout=s.layout, features=s.features,
                              audio_layer=self.student.audio_layer.config, transcribe_prompt=c.transcribe_prompt,
                              max_response_tokens=c.max_response_tokens, keep_features=keep, end_of_turn=self.end_of_turn,
                              text_prompt=self.text_kd, units=self.units) for i, r in enumerate(it)]

    def teacher_cache(self, spec: TargetSpec | None = None) -> TeacherCache:
        c, s = self.config, self.setup
        spec = spec or self.token_spec
        return TeacherCache(c.resolved_teacher_cache, s.teacher, list(spec.layers), spec.frames, s.features,
                            c.teacher_context_frames)

    def teacher_targets_for(self, examples: list[Example], desc: str, indices: list[int] | None = None,
                            memo: TargetMemo | None = None, spec: TargetSpec | None = None) -> list[torch.Tensor]:
        """Pooled teacher states of ``spec`` (default: the LLM layers' targets) for ``examples[indices]`` (all by
        default): memory, then disk cache, then the teacher itself in small batches (written to the cache)."""
        c, s = self.config, self.setup
        spec = spec or self.token_spec
        memo = {} if memo is None else memo
        indices = list(range(len(examples))) if indices is None else indices
        cache = self.teacher_cache(spec)
        todo = []
        for i in dict.fromkeys(indices):
            if spec.name not in memo.get(i, {}):
                t = cache.get(examples[i].key)
                if t is None:
                    todo.append(i)
                else:
                    memo.setdefault(i, {})[spec.name] = t
        bar = tqdm(total=len(todo), desc=desc, file=sys.stderr, disable=not c.progress or len(todo) < 50, leave=False)
        chunk_size = 8 if self.device.type == "cpu" else 64  # bounded memory on a CPU; a GPU wants bigger passes
        for start in range(0, len(todo), chunk_size):
            chunk = todo[start : start + chunk_size]
            samples = [torch.from_numpy(load_audio_file(examples[i].audio_path, sample_rate=s.features.sample_rate).samples.copy()) for i in chunk]
            for i, t in zip(chunk, teacher_targets(self.teacher_encoder, samples, list(spec.layers),
                                                   frames_per_token=spec.frames, features=s.features,
                                                   input_frames=s.teacher.input_frames,
                                                   context_frames=c.teacher_context_frames)):
                if t.shape[1] != spec.count(examples[i]):
                    raise RuntimeError(f"{examples[i].audio_path}: teacher gives {t.shape[1]} {spec.name}, the student {spec.count(examples[i])}")
                cache.put(examples[i].key, t)
                memo.setdefault(i, {})[spec.name] = t
            bar.update(len(chunk))
        bar.close()
        out = [memo[i][spec.name] for i in indices]
        if len(memo) > 1024 and memo is self.targets:  # ~0.3 MB each: bound memory; the disk cache keeps them all
            for k in list(memo)[: len(memo) - 512]:
                del memo[k]
        return out

    # ----------------------------------------------------------------- steps
    def _targets(self, examples: list[Example], idx: list[int], memo: TargetMemo, spec: TargetSpec) -> list[torch.Tensor]:
        """``spec``'s teacher targets of ``examples[idx]``, centered where the run says so."""
        targets = self.teacher_targets_for(examples, "teacher targets", idx, memo, spec)
        stats = self.target_stats.get(spec.name)
        return [stats.normalize(t) for t in targets] if stats is not None else targets

    def _losses(self, idx: list[int], examples: list[Example], memo: TargetMemo,
                keep_logits: bool = False, module: torch.nn.Module | None = None,
                step: int | None = None, samples: dict[Path, np.ndarray] | None = None) -> dict[str, torch.Tensor]:
        """Loss terms of one (micro-)batch; ``keep_logits`` also returns the CTC logits/lengths (for WER).
        ``step`` marks a training batch: its inputs get this step's SpecAugment masks (if on);
        ``samples`` are clips read ahead (``BatchReads``)."""
        c = self.config
        teach = self._targets(examples, idx, memo, self.token_spec) if self.distill else None
        frame_teach = self._targets(examples, idx, memo, self.frame_spec) if self.audio_distill else None
        chosen = with_features_batch([examples[i] for i in idx], self.setup.features, self.device, samples)
        if step is not None and self.spec_augment.enabled:
            chosen = [replace(e, features=self.spec_augment(e.features, e.num_frames, mask_seed(c.seed, step, i)))
                      for e, i in zip(chosen, idx)]
        batch = collate(chosen, self.pad_id, teach, text=self.text_kd, frame_teacher=frame_teach).to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=c.precision == "bf16"):
            out = (module or self.student)(batch, max_layer=c.max_layer, ctc_layer=self.ctc_layer, char_layer=self.char_layer)
            terms: dict[str, torch.Tensor] = {}
            loss = torch.zeros((), device=self.device)
            if self.use_ce:
                assert out.answer_logits is not None
                terms["ce"] = next_token_loss(out.answer_logits, out.answer_targets)
                loss = loss + c.ce_weight * terms["ce"]
            if self.text_kd:
                assert out.answer_logits is not None and batch.text_input_ids is not None and batch.text_labels is not None
                terms["text_kd"] = text_kd_loss(out.answer_logits, self._reading_logits(batch))
                loss = loss + c.text_kd_weight * terms["text_kd"]
            if self.distill:
                assert batch.teacher is not None
                per_layer = [distill_loss(self.student.heads[str(s)](out.audio_hidden[s]), batch.teacher[:, j],
                                          out.audio_mask, c.distill_loss) for j, s in enumerate(sorted(self.setup.layer_map))]
                terms["distill"] = torch.stack(per_layer).mean()
                loss = loss + c.distill_weight * terms["distill"]
            if batch.frame_teacher is not None:
                assert out.frame_pred is not None and out.frame_mask is not None
                terms["audio_distill"] = distill_loss(out.frame_pred, batch.frame_teacher[:, 0], out.frame_mask,
                                                      c.distill_loss)
                loss = loss + c.audio_distill_weight * terms["audio_distill"]
            if self.ctc_layer is not None:
                assert out.ctc_logits is not None
                terms["ctc"] = ctc_loss(out.ctc_logits, out.audio_tokens, batch.transcripts, self.blank_id)
                loss = loss + c.ctc_weight * terms["ctc"]
                if keep_logits:
                    terms["_ctc_logits"], terms["_ctc_lengths"] = out.ctc_logits.detach(), out.audio_tokens
            if self.char_layer is not None:
                assert out.char_logits is not None
                char_lengths = out.audio_tokens * CHAR_SLOTS
                terms["char_ctc"] = ctc_loss(out.char_logits, char_lengths, batch.char_transcripts, blank=0)
                loss = loss + c.char_ctc_weight * terms["char_ctc"]
                if keep_logits:
                    terms["_char_logits"], terms["_char_lengths"] = out.char_logits.detach(), char_lengths
            terms["loss"] = loss
        return terms

    @torch.no_grad()
    def _reading_logits(self, batch: Batch) -> torch.Tensor:
        """The frozen LLM (LoRA off) on the text-in-place-of-audio prompts: logits at the answer tokens."""
        lm = self.student.causal_lm
        with self.student.peft_model.disable_adapter():
            hidden = lm.model(input_ids=batch.text_input_ids, attention_mask=batch.text_attention_mask, use_cache=False)
            return lm.lm_head(hidden.last_hidden_state[batch.text_labels != -100])

    def _read_batch(self, step: int, idx: list[int]) -> BatchReads:
        """The disk reads of one batch (runs on the prefetch thread: touches no trainer state)."""
        caches = [(spec.name, self.teacher_cache(spec)) for spec in self.specs]
        rate = self.setup.features.sample_rate
        samples: dict[Path, np.ndarray] = {}
        targets: TargetMemo = {}
        for i in idx:
            e = self.examples[i]
            if e.features is None and e.audio_path not in samples:
                samples[e.audio_path] = load_audio_file(e.audio_path, sample_rate=rate).samples
            for name, cache in caches:
                if (t := cache.get(e.key)) is not None:
                    targets.setdefault(i, {})[name] = t
        return BatchReads(step, samples, targets)

    def _reads_for(self, step: int) -> BatchReads | None:
        """This step's reads if they were made ahead (None without prefetch, or after a jump in steps),
        and the next step's reads started."""
        if self._reader is None:
            return None
        ahead, self._ahead = self._ahead, self._reader.submit(self._read_batch, step + 1, self.batch_indices(step + 1))
        reads = ahead.result() if ahead is not None else None
        return reads if reads is not None and reads.step == step else None

    def train_step(self, step: int) -> dict[str, float]:
        lr = lr_at(step, self.config, self._elapsed())
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)  # checkpoints from before the groups lack it
        idx = self.batch_indices(step)
        reads = self._reads_for(step)
        if reads is not None:
            for i, read in reads.targets.items():
                for name, t in read.items():
                    self.targets.setdefault(i, {}).setdefault(name, t)
        micro = len(idx) // self.config.grad_accum
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for m in range(self.config.grad_accum):
            with self.micro_batch_context(last=m == self.config.grad_accum - 1):
                terms = self._losses(idx[m * micro : (m + 1) * micro], self.examples, self.targets, module=self.train_module(),
                                     step=step, samples=reads.samples if reads is not None else None)
                (terms["loss"] / self.config.grad_accum).backward()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) / self.config.grad_accum
        self.reduce_gradients()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
        self.optimizer.step()
        rec = dict(sums)
        rec["grad_norm"] = float(grad_norm)
        rec["lr"] = self.optimizer.param_groups[0]["lr"]
        return rec

    # Hooks for data parallelism (adapters.training.ddp overrides them).
    def batch_indices(self, step: int) -> list[int]:
        """This process's examples for ``step``."""
        return self.order.batch(step)

    def train_module(self) -> torch.nn.Module:
        """The module training steps run through (the DDP wrapper under torchrun)."""
        return self.student

    def micro_batch_context(self, *, last: bool) -> contextlib.AbstractContextManager[None]:
        """Context of one micro-batch's forward/backward (DDP skips the gradient sync until the last)."""
        return contextlib.nullcontext()

    def reduce_gradients(self) -> None:
        """Called after all micro-batches, before clipping."""

    @torch.no_grad()
    def evaluate(self, *, wer: bool = False) -> dict[str, float] | None:
        """Held-out losses as ``eval_<term>``; with ``wer`` also the WER of transcribe rows (best-path CTC in a
        truncated stage, greedy decoding of the full student otherwise)."""
        if not self.eval_examples:
            return None
        result = self._mean_losses(self.eval_examples, self.eval_targets, "eval")
        if wer and self.config.max_layer is None:
            self.student.eval()
            result["eval_wer"] = self.greedy_wer()
            self.student.train()
        return result

    @torch.no_grad()
    def validate(self) -> dict[str, float] | None:
        """Mean loss terms on the held-back training sentences (``val_sentences``), as ``val_<term>``; None without."""
        if not self.val_examples:
            return None
        return self._mean_losses(self.val_examples, self.val_targets, "val")

    @torch.no_grad()
    def _mean_losses(self, examples: list[Example], targets: TargetMemo, prefix: str) -> dict[str, float]:
        """Mean loss terms over ``examples`` as ``<prefix>_<term>``, with the CTC heads' WER/CER where the stage has
        them. One task per batch, so the next-token loss is also reported per task: transcripts and the LLM's own
        answers differ by ~1 nat even when the audio is understood, and a mixed number cannot tell a better
        transcriber from a different task mix."""
        from adapters.training.evaluate import cer
        from adapters.training.evaluate import wer as corpus_wer

        self.student.eval()
        sums: dict[str, float] = {}
        n = len(examples)
        bs = max(1, self.config.batch_size // self.config.grad_accum)
        refs: list[str] = []
        ctc_hyps: list[str] = []
        char_refs: list[str] = []
        char_hyps: list[str] = []
        by_task: dict[str, list[int]] = {}
        for i, e in enumerate(examples):
            by_task.setdefault(e.task, []).append(i)
        task_ce: dict[str, float] = {}
        for task, members in sorted(by_task.items()):
            for start in range(0, len(members), bs):
                idx = members[start : start + bs]
                terms = self._losses(idx, examples, targets, keep_logits=True)
                if "_ctc_logits" in terms:
                    hyps = greedy_ctc(terms.pop("_ctc_logits"), terms.pop("_ctc_lengths"), self.blank_id)
                    refs += [self.tokenizer.decode(examples[i].transcript_ids) for i in idx]
                    ctc_hyps += [self.tokenizer.decode(h) for h in hyps]
                if "_char_logits" in terms:
                    hyps = greedy_ctc(terms.pop("_char_logits"), terms.pop("_char_lengths"), blank=0)
                    char_refs += [self.units.decode(examples[i].transcript_chars) for i in idx]
                    char_hyps += [self.units.decode(h) for h in hyps]
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + float(v) * len(idx)
                if "ce" in terms:
                    task_ce[task] = task_ce.get(task, 0.0) + float(terms["ce"]) * len(idx) / len(members)
        result = {f"{prefix}_{k}": v / n for k, v in sums.items()}
        if len(task_ce) > 1:
            result.update({f"{prefix}_ce_{task}": v for task, v in task_ce.items()})
        if ctc_hyps:
            result[f"{prefix}_ctc_wer"] = corpus_wer(refs, ctc_hyps)
        if char_hyps:
            result[f"{prefix}_char_cer"] = cer(char_refs, char_hyps)
        self.student.train()
        return result

    def keep_if_best(self, step: int, val: dict[str, float]) -> bool:
        """Write this step's trainable weights to ``BEST_FILE`` when its validation loss is the lowest yet (temp file
        and rename, as checkpoints); the record travels in every checkpoint, so a resumed run keeps choosing."""
        metric = "val_ce" if "val_ce" in val else "val_loss"
        if self.best is not None and val[metric] >= self.best["value"]:
            return False
        path = self.work_dir / BEST_FILE
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"step": step, "fingerprint": self.run_fingerprint(), "trainable": self.student.trainable_state()}, tmp)
        tmp.replace(path)
        self.best = {"step": step, "metric": metric, "value": val[metric]}
        return True

    def _load_best(self) -> dict[str, Any] | None:
        """Put the best validated step's weights in the student (before an export); None when nothing chose one."""
        path = self.work_dir / BEST_FILE
        if not self.config.val_sentences or self.best is None or not path.is_file():
            return None
        state = torch.load(path, map_location=self.device, weights_only=False)
        if state["fingerprint"] != self.run_fingerprint() or state["step"] != self.best["step"]:
            # e.g. killed after writing a better step but before the checkpoint that records it: that step's weights
            # are not the ones on record, so the export must not fail at the end of a lease; it takes the last step
            log.warning("%s holds step %s, the run's record says step %s: exporting the last step instead",
                        path, state["step"], self.best["step"])
            return None
        self.student.load_trainable_state(state["trainable"])
        return self.best

    @torch.no_grad()
    def char_logits(self, examples: list[Example]) -> list[torch.Tensor]:
        """Per clip, the character head's (slots, 1 + units) logits over its valid slots: what the run
        spells, in ``self.units`` (``bench/char_readout.py`` reads them). Needs a run with ``char_ctc_weight``."""
        if self.char_layer is None:
            raise ConfigError("the run has no character head (char_ctc_weight 0)")
        was_training = self.student.training
        self.student.eval()
        bs = max(1, self.config.batch_size // self.config.grad_accum)
        out: list[torch.Tensor] = []
        memo: dict[int, torch.Tensor] = {}
        for start in range(0, len(examples), bs):
            idx = list(range(start, min(start + bs, len(examples))))
            terms = self._losses(idx, examples, memo, keep_logits=True)
            out += [terms["_char_logits"][b, : int(n)].float().cpu() for b, n in enumerate(terms["_char_lengths"].tolist())]
        self.student.train(was_training)
        return out

    @torch.no_grad()
    def greedy_wer(self) -> float:
        """WER of the full student's greedy transcripts on up to ``wer_examples`` held-out transcribe rows."""
        from adapters.training.evaluate import wer as corpus_wer

        rows = [e for e in self.eval_examples if e.task == "transcribe"][: self.config.wer_examples]
        eos = {self.end_of_turn}
        refs, hyps = [], []
        for e in rows:
            feats = with_features(e, self.setup.features).features
            assert feats is not None
            out = self.student.greedy(e.prompt_ids, e.audio_start, feats, e.num_frames,
                                      max_new_tokens=self.config.max_response_tokens, eos_ids=eos)
            refs.append(self.tokenizer.decode(e.transcript_ids))
            hyps.append(self.tokenizer.decode([t for t in out if t not in eos]))
        return corpus_wer(refs, hyps) if rows else float("nan")

    # ----------------------------------------------------------- checkpoints
    def checkpoints(self) -> list[Path]:
        return sorted(self.work_dir.glob(CHECKPOINT_GLOB))

    def save_checkpoint(self, step: int) -> Path:
        """Trainable weights + optimizer + history; written to a temp file and renamed, so a kill mid-save is harmless."""
        path = self.work_dir / f"ckpt-{step:07d}.pt"
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"step": step, "fingerprint": self.run_fingerprint(), "trainable": self.student.trainable_state(),
                    "optimizer": self.optimizer.state_dict(), "history": self.history,
                    "rng": torch.get_rng_state(), "elapsed_s": self._elapsed(), "best": self.best}, tmp)
        tmp.replace(path)
        for old in self.checkpoints()[: -self.config.keep_checkpoints]:
            old.unlink(missing_ok=True)
        return path

    def run_fingerprint(self) -> str:
        """The settings' fingerprint plus what the paths hold: the base model's and the teacher's
        weights, the training manifest, and the adapter a run starts from. Content, not paths, so a
        checkpoint resumes on another machine (a later GPU lease) but never on other data."""
        if self._run_fingerprint is None:
            c, s = self.config, self.setup
            parts = [c.fingerprint(), s.base.fingerprint, s.teacher.fingerprint, sha256_file(Path(c.manifest))]
            if c.init_from is not None:
                parts += [sha256_file(p) for p in sorted(Path(c.init_from).iterdir()) if p.is_file()]
            self._run_fingerprint = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
        return self._run_fingerprint

    def load_checkpoint(self, path: Path) -> int:
        state = torch.load(path, map_location=self.device, weights_only=False)
        if state["fingerprint"] != self.run_fingerprint():
            raise ConfigError(f"{path} was written by a run with different settings; use another work_dir or resume: false")
        self.student.load_trainable_state(state["trainable"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.history = list(state["history"])
        torch.set_rng_state(state["rng"])
        self.elapsed_s = float(state.get("elapsed_s", 0.0))
        self.best = state.get("best")
        return int(state["step"])

    def _elapsed(self) -> float:
        """Training wall time over all sittings (a resumed run continues the clock)."""
        t0 = getattr(self, "_t0", None)
        return self.elapsed_s + (time.perf_counter() - t0 if t0 is not None else 0.0)

    # ------------------------------------------------------------------ run
    def train(self, *, stop_after: int | None = None) -> int:
        """Run steps up to ``config.steps`` (or ``stop_after``, for tests of interruption); returns the last step done."""
        c = self.config
        start = 0
        ckpts = self.checkpoints()
        if c.resume and ckpts:
            start = self.load_checkpoint(ckpts[-1])
            log.info("resumed from %s at step %d", ckpts[-1], start)
        end = min(c.steps, stop_after) if stop_after is not None else c.steps
        if c.time_budget_s is not None and self.elapsed_s >= c.time_budget_s:
            end = start  # resumed after the budget was spent: nothing left to train
        log_file = self.work_dir / "train_log.jsonl"
        bar = tqdm(total=c.steps, initial=start, desc="train", file=sys.stderr, disable=not c.progress, dynamic_ncols=True)
        t0, done = time.perf_counter(), 0
        self._t0 = t0
        window: list[dict[str, float]] = []
        completed = start
        try:
            for step in range(start, end):
                rec = self.train_step(step)
                completed = step + 1
                done += 1
                if c.time_budget_s is not None and self._elapsed() >= c.time_budget_s:
                    end = completed  # the budget is spent: this step is the last (logged, then saved below)
                    log.info("time budget of %.0f s reached at step %d", c.time_budget_s, completed)
                self._after_step(step, end, rec, window, bar, log_file, t0, done)
                if completed == end:
                    break
        except KeyboardInterrupt:
            # Ctrl-C keeps the work: the next run with resume: true continues from here.
            bar.close()
            if completed > start:
                path = self.save_checkpoint(completed)
                print(f"interrupted; checkpoint {path} (resume with the same command)", file=sys.stderr)
            raise
        bar.close()
        last = end if end > start else start
        if end > start:
            self.save_checkpoint(last)
        self.steps_per_s = done / max(1e-9, time.perf_counter() - t0)
        return last

    def _after_step(self, step: int, end: int, rec: dict[str, float], window: list[dict[str, float]], bar: Any,
                    log_file: Path, t0: float, done: int) -> None:
        """Progress bar, averaged log records, periodic evaluation and checkpoints after one step."""
        c = self.config
        window.append(rec)
        bar.update(1)
        bar.set_postfix({k: f"{rec[k]:.3f}" for k in LOSS_TERMS if k in rec})
        if (step + 1) % c.log_every == 0 or step + 1 == end:
            avg = {k: sum(r[k] for r in window) / len(window) for k in window[0]}
            avg.update(step=step + 1, steps_per_s=done / (time.perf_counter() - t0), time=time.time(),
                       elapsed_s=round(self._elapsed(), 1))
            self.history.append(avg)
            window.clear()
            with open(log_file, "a") as f:
                f.write(json.dumps(avg) + "\n")
        want_wer = bool(c.wer_every) and (step + 1) % c.wer_every == 0
        if ((c.eval_every and (step + 1) % c.eval_every == 0) or want_wer) and step + 1 < c.steps:
            t_eval = time.perf_counter()
            ev = self._step_evaluation(step + 1, wer=want_wer)
            if ev:
                ev["eval_s"] = round(time.perf_counter() - t_eval, 1)
                self._record(ev)
                bar.write(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in ev.items()), file=sys.stderr)
        if c.save_every and (step + 1) % c.save_every == 0 and step + 1 < end:
            self.save_checkpoint(step + 1)

    def _last_train_record(self) -> dict[str, float]:
        """The last logged training record (evaluation records have no ``loss``); {} before any."""
        return next((h for h in reversed(self.history) if "loss" in h), {})

    def final_losses(self) -> dict[str, float]:
        """The loss terms of the last logged training record (what provenance and results report)."""
        last = self._last_train_record()
        return {k: last[k] for k in LOSS_TERMS if k in last}

    def export(self, final_eval: dict[str, float] | None = None) -> Path:
        """Write the adapter: the last step's weights, or with ``val_sentences`` the best validated step's (loaded into
        the student here; export ends a run). ``losses.eval`` is then that step's evaluation record."""
        c, s = self.config, self.setup
        best = self._load_best()
        selected = None
        if best is not None:
            final_eval = next((h for h in reversed(self.history) if h.get("step") == best["step"] and best["metric"] in h),
                              final_eval)
            selected = {**best, "val_sentences": c.val_sentences, "val_rows": len(self.val_examples),
                        "last_step": self._last_train_record().get("step", 0)}
        provenance = {
            "kind": "aura_distillation",
            "data": {"manifest": str(c.manifest), "sha256": sha256_file(c.manifest), "rows": len(self.examples),
                     "tasks": {t: sum(e.task == t for e in self.examples) for t in ("transcribe", "qa")}},
            "steps": self._last_train_record().get("step", 0),
            "batch_size": c.batch_size, "lr": c.lr, "seed": c.seed, "precision": c.precision,
            "losses": {"final": self.final_losses(), "eval": final_eval, "history": self.history[-50:]},
            "teacher": {"path": str(c.teacher), "name": Path(c.teacher).name, "fingerprint": s.teacher.fingerprint,
                        "width": s.teacher.width, "layers": s.teacher.num_layers},
            "layer_map": {str(k): v for k, v in s.layer_map.items()},
            "distill_loss": c.distill_loss if self.distill else "none", "distill_weight": c.distill_weight if self.distill else 0.0,
            "distill_targets": c.distill_targets if self.distill or self.audio_distill else "raw",
            "audio_distill": ({"weight": c.audio_distill_weight, "teacher_layer": self.frame_spec.layers[0]}
                              if self.audio_distill else None),
            "lora": {"rank": c.lora_rank, "alpha": c.lora_alpha, "targets": c.lora_targets, "layers": c.lora_layers,
                     "rank_layers": c.lora_rank_layers},
            "stem_init": getattr(self, "stem_init", "init_from"), "transcribe_prompt": c.transcribe_prompt,
            "end_of_turn_id": self.end_of_turn,
            "config_fingerprint": c.fingerprint(),
            "stage": {"max_layer": c.max_layer, "ctc_weight": c.ctc_weight, "ctc_layer": self.ctc_layer,
                      "char_ctc_weight": c.char_ctc_weight, "char_ctc_layer": self.char_layer, "char_ctc_units": self.units.name,
                      "ce_weight": c.ce_weight if self.use_ce else 0.0, "text_kd_weight": c.text_kd_weight if self.text_kd else 0.0,
                      "tasks": c.tasks,
                      "teacher_context_frames": c.teacher_context_frames, "init_from": str(c.init_from) if c.init_from else None},
            "elapsed_s": round(self._elapsed(), 1),
            "selected": selected,
        }
        aura = AuraConfig(base_model=base_model_ref(s.base), features=s.features, audio_layer=self.student.audio_layer.config,
                          prompt=s.layout, trained=True, training=provenance)
        return save_adapter(c.output, config=aura, audio_layer=self.student.audio_layer, peft_model=self.student.peft_model)

    def export_latest(self) -> Path:
        """The adapter as of the newest checkpoint, without training (e.g. to evaluate a run that goes on)."""
        ckpts = self.checkpoints()
        if not ckpts:
            raise ConfigError(f"no checkpoint in {self.work_dir} to export")
        self.load_checkpoint(ckpts[-1])
        return self.export()

    def _step_evaluation(self, step: int, *, wer: bool) -> dict[str, float] | None:
        """Held-out losses, the training sample's (``fit_examples``) and the validation losses of the weights of
        ``step``, which become the best step when their validation loss is the lowest yet; None with none of the three."""
        ev = self.evaluate(wer=wer) or {}
        if self.fit_examples:
            ev.update(self._mean_losses(self.fit_examples, self.fit_targets, "fit"))
        val = self.validate()
        if val:
            ev.update(val)
            ev["val_best"] = self.keep_if_best(step, val)
        if not ev:
            return None
        ev.update(step=step, elapsed_s=round(self._elapsed(), 1))
        return ev

    def _record(self, ev: dict[str, float]) -> None:
        """An evaluation record into the history and ``train_log.jsonl``."""
        self.history.append(ev)
        with open(self.work_dir / "train_log.jsonl", "a") as f:
            f.write(json.dumps(ev) + "\n")

    def final_evaluation(self, last: int) -> dict[str, float] | None:
        """Evaluate the weights of step ``last`` (with WER when the run measures it) and record it, so a run's learning
        curve ends at its last step (and that step can be the best validated one); None without held-out or
        validation rows."""
        ev = self._step_evaluation(last, wer=bool(self.config.wer_every))
        if ev:
            self._record(ev)
        return ev

    def run(self) -> TrainResult:
        last = self.train()
        ev = self.final_evaluation(last)
        out = self.export(ev)
        return TrainResult(out, last, self.final_losses(), ev, getattr(self, "steps_per_s", 0.0))
