"""The read-out with the teacher's own features: how far can the LLM learn to read Whisper at this scale?

Every CPU run so far left the LM-head CTC at block 9 on its plateau (best-path WER 0.89-0.95) and
the held-out character error rate of the block-2 head at 0.56-0.72, while linear probes read
Whisper tiny.en's last block at 0.39. Two stories fit: the student's audio layer and first blocks
do not yet carry the words (then the levers are the audio layer and its distillation), or the
LLM blocks above them cannot learn to read words in a few thousand examples whatever they are
given (then no CPU A/B of the read-out can tell levers apart, and only the GPU run can).

This runs the trainer's own recipe with one change: the audio layer is replaced by the frozen
teacher itself, run on each clip alone (bidirectional, as Whisper runs; block ``--teacher-layer``,
the last by default, with the final LayerNorm), pooled to the student's audio-token rate exactly
as the distillation targets are, then a trainable LayerNorm + Linear to the LLM width. Same
rows, batch order, losses, LoRA and held-out evaluation, so its curve sits beside the student's
(`.aura/runs/voices_ab/table.py`). It is a diagnostic, not an adapter: the teacher sits in
inference, so nothing is exported; checkpoints resume it like any run.

    python -m bench.oracle_readout --config bench/train_char_ctc_cpu.yaml --student S --teacher T \\
        --manifest ROWS.jsonl --eval-manifest C/heldout.jsonl --teacher-cache $AURA_HOME/teacher_cache --work-dir RUN/work
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from adapters.audio_layer import AudioLayerConfig, embedding_rms, scale_to_rms
from adapters.training.teacher import encoder_states, pool_frames

if TYPE_CHECKING:
    from adapters.training.trainer import Trainer


class TeacherReadout(nn.Module):
    """In the audio layer's place: (B, n_mels, T) log-mel + (B,) frames -> (B, N, hidden) + (B,) tokens.

    Each clip runs through the frozen teacher alone, on its own frames, so padding and batch-mates
    change nothing; the token count is the audio layer's (stem stride 2, then ``frames_per_token``), so
    the prompt layout and the loss positions are the student's. ``config`` is the replaced audio
    layer's: the trainer reads its token layout (frames per token) from it."""

    def __init__(self, encoder: nn.Module, layer: int, config: AudioLayerConfig, target_rms: float) -> None:
        super().__init__()
        self.encoder = encoder.requires_grad_(False).eval()
        self.layer = layer
        self.config = config
        width = int(encoder.layer_norm.normalized_shape[0])
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, config.hidden_size)
        scale_to_rms(self.proj, target_rms)  # fresh vectors at the token embeddings' scale, as the audio layer starts

    def train(self, mode: bool = True) -> "TeacherReadout":
        super().train(mode)
        self.encoder.eval()  # the teacher stays in eval mode (no dropout) whatever the student does
        return self

    def teacher_states(self, features: torch.Tensor, frame_lengths: torch.Tensor) -> list[torch.Tensor]:
        """Per clip: (tokens, width) pooled teacher states, from the clip's own frames only.

        One batched pass with each clip's length masked (``encoder_states(lengths=...)``), not one pass per clip. On the
        2026-11-28 lease this arm ran half the students' steps (188 against ~385 in the same time, three arms sharing
        one H200); its per-clip loop, ~90 eager operators per clip and 128 clips a step, is the likely cause, and one
        pass is ~90 operators a step. On a CPU the batched pass costs more, since every clip is padded to the longest
        (16 held-out clips, one thread, beside three jobs: 1.55 s against 0.78 s)."""
        n = frame_lengths.clamp(min=1)
        with torch.no_grad():
            hs = encoder_states(self.encoder, features[:, :, : int(n.max())], [self.layer], lengths=n)[self.layer]
        out = []
        for b, k in enumerate(n.tolist()):
            valid = (int(k) + 1) // 2
            out.append(pool_frames(hs[b, :valid], valid, self.config.frames_per_token))
        return out

    def forward(self, features: torch.Tensor, frame_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokens(*self.frames(features, frame_lengths))

    def frames(self, features: torch.Tensor, frame_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The audio layer's ``frames``: here the teacher's states, already one per token."""
        states = self.teacher_states(features, frame_lengths)
        lengths = torch.tensor([s.shape[0] for s in states], device=features.device)
        return torch.nn.utils.rnn.pad_sequence(states, batch_first=True), lengths

    def tokens(self, states: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.proj(self.norm(states))
        mask = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]
        return x * mask[..., None], lengths


def install(trainer: Trainer, layer: int | None = None) -> TeacherReadout:
    """Put a ``TeacherReadout`` of the trainer's own teacher in the student's audio layer and rebuild
    the optimizer over what trains now. Before the first step (or a resume) only."""
    encoder = trainer.teacher_encoder
    last = len(encoder.layers) - 1
    layer = last if layer is None else layer
    if not 0 <= layer <= last:
        raise ValueError(f"--teacher-layer {layer}: the teacher has blocks 0..{last}")
    if trainer.audio_distill:
        raise ValueError("audio_distill_weight distils into the audio layer, which the teacher replaces here; set it to 0")
    rms = embedding_rms(trainer.student.causal_lm)
    readout = TeacherReadout(encoder, layer, trainer.student.audio_layer.config, rms)
    trainer.student.audio_layer = readout.to(trainer.device)
    trainer.rebuild_optimizer()
    return readout


def main(argv: list[str] | None = None) -> int:
    from adapters.training.config import add_config_flags, config_from_flags
    from adapters.training.trainer import ConfigError, Trainer

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Every `aura train` flag works here too (the same TrainConfig); nothing is exported.")
    p.add_argument("--teacher-layer", type=int, default=None, help="teacher block fed to the LLM (default: the last)")
    add_config_flags(p)
    args = p.parse_args(argv)
    if args.work_dir is None:
        p.error("--work-dir is required: checkpoints and train_log.jsonl go there (rerun to resume)")
    try:
        trainer = Trainer(config_from_flags(args, {"output": Path(args.work_dir) / "not-exported"}))
        readout = install(trainer, args.teacher_layer)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"oracle_readout: {e}", file=sys.stderr)
        return 2
    trainable = sum(p.numel() for p in readout.parameters() if p.requires_grad)
    print(json.dumps({"oracle": "teacher block", "layer": readout.layer, "readout_params": trainable}), file=sys.stderr, flush=True)
    last = trainer.train()
    ev = trainer.final_evaluation(last)
    print(json.dumps({"step": last, **(ev or {})}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
