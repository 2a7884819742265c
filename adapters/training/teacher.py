"""The frozen Whisper teacher: encoder hidden states at chosen layers, aligned to audio tokens.

Whisper's encoder sees every clip padded to 30 s (it has fixed position embeddings) and emits
one frame per two mel frames. The student has one audio token per ``2 * frames_per_token`` mel
frames (its blocks' stride times its stacking), so the teacher's *valid* frames are average-pooled in
groups of ``frames_per_token`` (the last group over the frames it has): token i of the student is
compared with exactly the span of audio it was built from. The teacher is frozen, so its targets are a
pure function of (clip, teacher, layers, frames per token) and are cached per clip on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from adapters.audio_layer import mean_pool
from adapters.features import FeatureConfig, log_mel


@dataclass
class TeacherInfo:
    path: Path
    width: int
    num_layers: int
    heads: int
    ffn_dim: int
    n_mels: int
    input_frames: int  # mel frames the encoder expects (2 * max_source_positions)
    fingerprint: str


def teacher_info(path: str | Path) -> TeacherInfo:
    """Read the teacher's shape from config.json without loading weights (for early config checks)."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"teacher {path}: not a model folder (no config.json)")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("model_type") != "whisper":
        raise ValueError(f"teacher {path}: model_type is {cfg.get('model_type')!r}; a Whisper model is required")
    h = hashlib.sha256(cfg_file.read_bytes())
    for w in sorted(path.glob("*.safetensors")):
        h.update(f"{w.name}:{w.stat().st_size}".encode())
        with open(w, "rb") as f:
            h.update(f.read(1 << 20))
    return TeacherInfo(
        path=path, width=int(cfg["d_model"]), num_layers=int(cfg["encoder_layers"]),
        heads=int(cfg.get("encoder_attention_heads", 6)), ffn_dim=int(cfg.get("encoder_ffn_dim", 4 * int(cfg["d_model"]))),
        n_mels=int(cfg.get("num_mel_bins", 80)), input_frames=2 * int(cfg.get("max_source_positions", 1500)),
        fingerprint="sha256:" + h.hexdigest()[:32],
    )


def load_teacher_encoder(path: str | Path, device: str | torch.device = "cpu") -> Any:
    """The encoder half of a Whisper checkpoint, frozen, eval mode, float32."""
    from transformers import WhisperModel

    model = WhisperModel.from_pretrained(str(path), dtype=torch.float32)
    encoder = model.get_encoder().to(device).eval().requires_grad_(False)
    return encoder


def pool_frames(hidden: torch.Tensor, valid: int, group: int) -> torch.Tensor:
    """(T, d) teacher frames -> (ceil(valid / group), d) means over consecutive groups of valid frames: one
    target per student audio token when ``group`` is the student's ``frames_per_token``."""
    pooled, _ = mean_pool(hidden[None, :valid], torch.tensor([valid], device=hidden.device), group)
    return pooled[0]


def lookahead_mask(frames: int, lookahead: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(1, 1, T, T) additive attention mask: frame i sees frames 0 .. i + lookahead (0 = causal)."""
    i = torch.arange(frames, device=device)
    allowed = i[None, :] <= i[:, None] + lookahead
    return torch.zeros(frames, frames, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


def encoder_states(encoder: Any, features: torch.Tensor, layers: list[int],
                   lookahead: int | None = None, stride: int = 1,
                   lengths: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
    """Outputs of Whisper encoder blocks ``layers`` (0-based) for (B, n_mels, T) log-mel input of any length.

    Whisper's own forward insists on 30 s inputs only because it adds its whole position table;
    the blocks take any length, so this runs the stem, the first ``T / 2`` positions and the blocks
    up to the deepest one wanted, itself. It does not ask transformers for ``output_hidden_states``:
    in transformers 5 those are captured by hooks, and a shallow copy of the encoder (how short
    inputs used to be run) made every block but the last report the same tensor, so three of four
    distillation targets were identical. The last block's output gets the final LayerNorm, as in
    Whisper's ``last_hidden_state`` (what its decoder reads).

    ``lookahead``: None runs the blocks as Whisper was trained (every frame sees the whole input); k >= 0 lets
    frame i see only frames up to i + k, which measures what a streaming (causal, k = 0) audio layer of Whisper's
    blocks keeps of them (``bench/probe_lookahead.py``).

    ``stride`` > 1 averages that many stem frames into one before the blocks, as the student's ``encoder_stride``
    does (positions are then counted in block frames, as the student's are); ``lookahead`` counts block frames.
    The batch's clips must then be unpadded (one clip, or equal lengths): the mean does not mask padding.

    ``lengths``: (B,) input frames of each clip of a padded batch. Each clip's first ``(n + 1) // 2`` states are then
    the ones it gets run alone (what ``bench/oracle_readout.py`` needs, one batched pass instead of one per clip): its
    input and the first conv's output past its end are zeroed, as the convs zero-pad a clip run alone, and no frame
    attends past it. The states past a clip's end are not meaningful.
    """
    F = torch.nn.functional
    keep = None
    if lengths is not None:
        if stride > 1:
            raise ValueError("lengths with stride > 1: the stride's mean does not mask padding")
        t = torch.arange(features.shape[-1], device=features.device)
        keep = (t[None, :] < lengths.to(features.device)[:, None]).to(features.dtype)[:, None, :]
        features = features * keep
    x = F.gelu(encoder.conv1(features))
    if keep is not None:
        x = x * keep.to(x.dtype)
    x = F.gelu(encoder.conv2(x)).permute(0, 2, 1)
    if stride > 1:
        x, _ = mean_pool(x, torch.full((x.shape[0],), x.shape[1], device=x.device), stride)
    positions = encoder.embed_positions.weight
    if x.shape[1] > positions.shape[0]:
        raise ValueError(f"{x.shape[1]} encoder frames exceed the teacher's {positions.shape[0]} positions")
    x = x + positions[: x.shape[1]].to(x.dtype)
    wanted = set(layers)
    last = len(encoder.layers) - 1
    out: dict[int, torch.Tensor] = {}
    mask = None if lookahead is None else lookahead_mask(x.shape[1], lookahead, x.dtype, x.device)
    if lengths is not None:  # no query attends to a frame past its clip: (B, 1, 1 or T, T)
        beyond = torch.arange(x.shape[1], device=x.device)[None, :] >= ((lengths.to(x.device) + 1) // 2)[:, None]
        allowed = mask if mask is not None else torch.zeros((), dtype=x.dtype, device=x.device)
        mask = torch.where(beyond[:, None, None, :], torch.finfo(x.dtype).min, allowed)
    for i, block in enumerate(encoder.layers[: max(wanted) + 1]):
        x = block(x, mask)
        x = x[0] if isinstance(x, tuple) else x
        if i in wanted:
            out[i] = encoder.layer_norm(x) if i == last else x
    return out


@torch.no_grad()
def teacher_targets(
    encoder: Any, samples: list[torch.Tensor], layers: list[int], *, frames_per_token: int,
    features: FeatureConfig, input_frames: int, context_frames: int | None = None,
) -> list[torch.Tensor]:
    """Per clip: (len(layers), num_audio_tokens, width) outputs of encoder blocks ``layers`` (0-based), pooled
    ``frames_per_token`` frames to a target (the student's ``AudioLayerConfig.frames_per_token``).

    ``context_frames``: pad each clip to a multiple of this many frames (clips of one length run
    together) instead of to ``input_frames``; a clip's targets never depend on its batch-mates.
    """
    device = next(encoder.parameters()).device
    if context_frames is None:
        groups = {input_frames: list(range(len(samples)))}
    else:
        groups = {}
        for i, s in enumerate(samples):
            n = max(1, features.num_frames(len(s)))
            padded = min(input_frames, -(-n // context_frames) * context_frames)
            groups.setdefault(padded, []).append(i)
    result: list[torch.Tensor | None] = [None] * len(samples)
    for padded, idx in groups.items():
        feats, frames = log_mel([samples[i].to(device).float() for i in idx], features, pad_to_frames=padded)
        hs = encoder_states(encoder, feats, layers)
        for b, (i, n_frames) in enumerate(zip(idx, frames.tolist())):
            valid = (int(n_frames) + 1) // 2  # Whisper's conv2 has stride 2, same as the student stem
            result[i] = torch.stack([pool_frames(hs[layer][b], valid, frames_per_token) for layer in layers]).cpu()
    return [r for r in result if r is not None]


@dataclass
class TargetStats:
    """Per-position mean and per-channel spread of pooled teacher targets, estimated on a sample.

    Whisper adds absolute position embeddings, and its early blocks keep much of them: a student
    that only tracks the audio token's index already matches raw targets to a cosine distance of
    about 0.1. Centering each position on its corpus mean leaves what the clip itself carries, so
    the distillation gradient is about the speech; positions past the sample's longest clip use
    the last mean.
    """

    mean: torch.Tensor  # (n_layers, positions, d)
    std: torch.Tensor  # (n_layers, d)

    @classmethod
    def estimate(cls, targets: list[torch.Tensor]) -> "TargetStats":
        if not targets:
            raise ValueError("no teacher targets to estimate centering statistics from")
        n_layers, _, width = targets[0].shape
        positions = max(t.shape[1] for t in targets)
        sums = torch.zeros(n_layers, positions, width, dtype=torch.float64)
        counts = torch.zeros(positions, dtype=torch.float64)
        for t in targets:
            sums[:, : t.shape[1]] += t.double()
            counts[: t.shape[1]] += 1
        mean = sums / counts[None, :, None]
        centered = torch.cat([(t.double() - mean[:, : t.shape[1]]) for t in targets], dim=1)
        std = centered.pow(2).mean(1).sqrt().clamp(min=1e-6)
        return cls(mean.float(), std.float())

    def normalize(self, target: torch.Tensor) -> torch.Tensor:
        """(n_layers, N, d) targets of one clip -> centered, scaled targets."""
        n = target.shape[1]
        mean = self.mean[:, :n]
        if n > mean.shape[1]:
            mean = torch.cat([mean, self.mean[:, -1:].expand(-1, n - mean.shape[1], -1)], dim=1)
        return (target - mean) / self.std[:, None, :]


class TeacherCache:
    """Pooled teacher targets per clip as small safetensors files; keyed so a stale entry is never used."""

    def __init__(self, root: Path, info: TeacherInfo, layers: list[int], frames_per_token: int,
                 features: FeatureConfig, context_frames: int | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        salt: list[Any] = [info.fingerprint, layers, frames_per_token, features.model_dump()]  # old keys: stack_factor
        salt.append("blocks-v2")  # targets made before encoder_states (identical early layers) are never reused
        if context_frames is not None:  # 30 s targets keep their old keys
            salt.append(context_frames)
        self.salt = json.dumps(salt, sort_keys=True)

    def path(self, clip_key: str) -> Path:
        return self.root / (hashlib.sha256((self.salt + clip_key).encode()).hexdigest()[:32] + ".safetensors")

    def get(self, clip_key: str) -> torch.Tensor | None:
        p = self.path(clip_key)
        if not p.is_file():
            return None
        try:
            return load_file(str(p))["t"]
        except Exception:  # noqa: BLE001 - a torn write from a killed run (any error): recompute
            return None

    def put(self, clip_key: str, value: torch.Tensor) -> None:
        p = self.path(clip_key)
        tmp = p.with_name(f"{p.name}.{os.getpid()}.tmp")  # runs sharing a cache may write the same clip at once
        save_file({"t": value.to(torch.float32).contiguous()}, str(tmp))
        tmp.replace(p)
