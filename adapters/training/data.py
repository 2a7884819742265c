"""Manifest rows -> training examples, laid out exactly as the server lays out a request.

The prompt comes from :func:`adapters.prompt.build_prompt` with the adapter's own
:class:`PromptLayout` and ``user_turn`` (audio, then optional text), so the token sequence the
LoRA is trained on is the one vLLM later sees. The answer tokens follow the generation prompt
and end with the tokenizer's end-of-turn token, so the adapter learns to stop.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from adapters.audio import load_audio_file
from adapters.audio_layer import AudioLayerConfig
from adapters.features import FeatureConfig, log_mel
from adapters.prompt import PromptLayout, TextPart, Turn, build_prompt, end_of_turn_id, user_turn
from adapters.training.ctc import CHAR_UNITS, Units


class ManifestRow(BaseModel):
    """One JSONL line. ``audio`` is relative to the manifest; extra keys (voice, split...) are kept."""

    model_config = ConfigDict(extra="allow")

    audio: str
    task: Literal["transcribe", "qa"]
    text: str
    prompt: str | None = None
    response: str | None = None

    def audio_path(self, manifest_dir: Path) -> Path:
        p = Path(self.audio).expanduser()
        return p if p.is_absolute() else manifest_dir / p


def read_manifest(path: str | Path, *, check_audio: bool = True) -> list[ManifestRow]:
    """Parse and check a manifest up front, so a typo fails in a second, not an hour into training."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist")
    rows: list[ManifestRow] = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = ManifestRow.model_validate(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
        except ValidationError as e:
            first = e.errors()[0]
            raise ValueError(f"{path}:{lineno}: field '{'.'.join(map(str, first['loc']))}': {first['msg']}") from e
        if check_audio and not row.audio_path(path.parent).is_file():
            raise FileNotFoundError(f"{path}:{lineno}: audio file {row.audio_path(path.parent)} does not exist")
        rows.append(row)
    if not rows:
        raise ValueError(f"manifest {path} has no rows")
    return rows


def read_manifest_absolute(path: str | Path) -> list[ManifestRow]:
    """A manifest's rows with absolute audio paths (unchecked), so subsets and variants of it can be
    written to any folder (benchmarks and probes)."""
    path = Path(path).resolve()
    return [r.model_copy(update={"audio": str(r.audio_path(path.parent))}) for r in read_manifest(path, check_audio=False)]


def write_manifest(path: str | Path, rows: list[ManifestRow]) -> None:
    """Atomic rewrite (temp + rename) so an interrupted ``aura data responses`` never truncates data."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(r.model_dump_json(exclude_none=True) + "\n" for r in rows))
    tmp.replace(path)


def row_prompt_text(row: ManifestRow, transcribe_prompt: str) -> str | None:
    """The text that follows the audio in the user turn: fixed for transcription, optional for QA."""
    if row.task == "transcribe":
        return row.prompt or transcribe_prompt
    return row.prompt


def row_target(row: ManifestRow, where: str) -> str:
    if row.task == "transcribe":
        return row.text
    if row.response is None:
        raise ValueError(f"{where}: qa row has no 'response'; fill it with `aura data responses --manifest ...`")
    return row.response


def text_question(row: ManifestRow) -> str:
    """What the base LLM is asked for a qa row's reference answer: the transcript in place of the audio."""
    return row.text if not row.prompt else row.text + "\n" + row.prompt


@dataclass
class Example:
    """One clip ready for the student: features, prompt ids with the audio span, answer ids."""

    index: int
    key: str  # stable per clip, used for the teacher cache
    audio_path: Path
    features: torch.Tensor | None  # (n_mels, frames); None = computed from the clip when batched (large corpora)
    num_frames: int
    num_audio_tokens: int
    prompt_ids: list[int]
    audio_start: int
    target_ids: list[int]
    task: str
    transcript_ids: list[int]  # the spoken words' tokens (CTC target; for qa rows not the answer)
    text_prompt_ids: list[int] = field(default_factory=list)  # the same prompt with the transcript in place of the audio
    transcript_chars: list[int] = field(default_factory=list)  # the spoken words in the character head's units (its CTC target)


def build_example(
    index: int, row: ManifestRow, manifest_dir: Path, *, tokenizer: Any, layout: PromptLayout,
    features: FeatureConfig, audio_layer: AudioLayerConfig, transcribe_prompt: str, max_response_tokens: int,
    samples: torch.Tensor | None = None, keep_features: bool = True, end_of_turn: int | None = None,
    text_prompt: bool = False, units: Units = CHAR_UNITS,
) -> Example:
    """One manifest row as an :class:`Example`. ``end_of_turn``: the answer's closing token (looked up
    from the chat template when None; callers building many examples pass it once). ``text_prompt``:
    also build the prompt with the transcript in place of the audio (for text_kd). ``units``: what the
    character head's target spells the transcript in."""
    path = row.audio_path(manifest_dir)
    if samples is None:
        samples = torch.from_numpy(load_audio_file(path, sample_rate=features.sample_rate).samples.copy())
    if keep_features:
        feats, frames = log_mel([samples.float()], features)
        n_frames = int(frames[0])
    else:  # a 10k-clip corpus's features are GBs: keep the frame count only
        feats, n_frames = None, features.num_frames(len(samples))
    if n_frames == 0:
        raise ValueError(f"{path}: clip is shorter than one feature frame")
    n_tok = audio_layer.num_tokens(n_frames)
    prompt_text = row_prompt_text(row, transcribe_prompt)
    prompt = build_prompt(tokenizer, layout, [user_turn(n_tok, prompt_text)])
    text_ids: list[int] = []
    if text_prompt:  # what the LLM reads when the words arrive as text: the transcript between the audio markers
        spoken = TextPart(layout.audio_start + row.text + layout.audio_end)
        text_ids = build_prompt(tokenizer, layout, [Turn("user", (spoken, TextPart(prompt_text)) if prompt_text else (spoken,))]).token_ids
    target = tokenizer.encode(row_target(row, str(path)), add_special_tokens=False)[:max_response_tokens - 1]
    target.append(end_of_turn if end_of_turn is not None else end_of_turn_id(tokenizer))
    stat = path.stat()
    return Example(
        index=index, key=f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}", audio_path=path,
        features=feats[0, :, :n_frames].contiguous() if feats is not None else None, num_frames=n_frames, num_audio_tokens=n_tok,
        prompt_ids=prompt.token_ids, audio_start=prompt.audio_spans[0][0], target_ids=target, task=row.task,
        transcript_ids=tokenizer.encode(row.text, add_special_tokens=False), text_prompt_ids=text_ids,
        transcript_chars=units.encode(row.text),
    )


@dataclass
class Batch:
    """Right-padded batch. Right padding keeps every example's positions and causal mask identical
    to serving it alone, so padding never changes what an example is trained on."""

    input_ids: torch.Tensor  # (B, L) with placeholder ids at audio positions
    attention_mask: torch.Tensor  # (B, L)
    labels: torch.Tensor  # (B, L) next-token targets aligned to positions (-100 = ignored)
    features: torch.Tensor  # (B, n_mels, T)
    frame_lengths: torch.Tensor  # (B,)
    audio_starts: torch.Tensor  # (B,)
    audio_tokens: torch.Tensor  # (B,)
    teacher: torch.Tensor | None  # (B, n_layers, N, d_teacher) pooled teacher states, zero past audio_tokens
    transcripts: list[list[int]]  # CTC targets
    char_transcripts: list[list[int]] = field(default_factory=list)  # character CTC targets
    frame_teacher: torch.Tensor | None = None  # (B, n_layers, F, d_teacher) the audio layer's targets, zero past each clip's
    text_input_ids: torch.Tensor | None = None  # (B, Lt) the text-in-place-of-audio prompts + answers (text_kd)
    text_attention_mask: torch.Tensor | None = None
    text_labels: torch.Tensor | None = None  # same answer tokens as ``labels``, at the text prompt's positions

    def to(self, device: str | torch.device) -> "Batch":
        return Batch(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()})


def with_features(e: Example, features: FeatureConfig) -> Example:
    """``e`` with its log-mel features, computed from the clip if they were not kept."""
    return with_features_batch([e], features)[0]


def with_features_batch(examples: list[Example], features: FeatureConfig, device: torch.device | str = "cpu",
                        samples: Mapping[Path, np.ndarray] | None = None) -> list[Example]:
    """``examples`` with their features, the missing ones computed in one batched pass on ``device``.

    A large corpus keeps no features in memory; computing a batch's log-mels together on the
    training device keeps a GPU fed where a per-clip CPU loop would starve it. ``samples`` holds
    clips already read (audio path -> samples, e.g. by the trainer's prefetch); the rest are read here.
    """
    todo = [i for i, e in enumerate(examples) if e.features is None]
    if not todo:
        return examples
    samples = samples or {}
    waves = [torch.from_numpy(np.array(samples[p] if (p := examples[i].audio_path) in samples
                                       else load_audio_file(p, sample_rate=features.sample_rate).samples)).to(device)
             for i in todo]
    feats, frames = log_mel([w.float() for w in waves], features)
    out = list(examples)
    for j, i in enumerate(todo):
        e = examples[i]
        if int(frames[j]) != e.num_frames:
            raise RuntimeError(f"{e.audio_path}: the clip changed since training started ({int(frames[j])} frames, was {e.num_frames})")
        out[i] = replace(e, features=feats[j, :, : e.num_frames].float().contiguous())  # stays on ``device``
    return out


def _pad_answers(prompts: list[list[int]], targets: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded prompt+answer ids, mask, and labels that hold the answer at the positions predicting it."""
    seqs = [p + t for p, t in zip(prompts, targets)]
    length = max(len(s) for s in seqs)
    b = len(seqs)
    input_ids = torch.full((b, length), pad_id, dtype=torch.long)
    mask = torch.zeros((b, length), dtype=torch.long)
    labels = torch.full((b, length), -100, dtype=torch.long)
    for i, (p, t, s) in enumerate(zip(prompts, targets, seqs)):
        input_ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        # position len(p)-1 (last prompt token) predicts the first answer token, and so on
        labels[i, len(p) - 1 : len(p) - 1 + len(t)] = torch.tensor(t)
    return input_ids, mask, labels


def _pad_targets(targets: list[torch.Tensor]) -> torch.Tensor:
    """Per example (n_layers, n, d) teacher targets -> (B, n_layers, max n, d), zero past each example's n."""
    n_layers, _, width = targets[0].shape
    out = torch.zeros((len(targets), n_layers, max(t.shape[1] for t in targets), width))
    for i, t in enumerate(targets):
        out[i, :, : t.shape[1]] = t.float()
    return out


def collate(examples: list[Example], pad_id: int, teacher: list[torch.Tensor] | None = None, *, text: bool = False,
            frame_teacher: list[torch.Tensor] | None = None) -> Batch:
    """``text`` also batches each example's text-in-place-of-audio prompt (for text_kd); ``teacher`` and
    ``frame_teacher`` are each example's targets for the LLM's layers (one per audio token) and for the audio layer's
    frames."""
    b = len(examples)
    input_ids, mask, labels = _pad_answers([e.prompt_ids for e in examples], [e.target_ids for e in examples], pad_id)
    text_ids = text_mask = text_labels = None
    if text:
        text_ids, text_mask, text_labels = _pad_answers([e.text_prompt_ids for e in examples], [e.target_ids for e in examples], pad_id)
    frames = max(e.num_frames for e in examples)
    if any(e.features is None for e in examples):
        raise ValueError("collate needs features: pass examples through with_features first")
    n_mels = examples[0].features.shape[0]  # type: ignore[union-attr]
    feats = torch.zeros((b, n_mels, frames), device=examples[0].features.device)  # type: ignore[union-attr]
    for i, e in enumerate(examples):
        feats[i, :, : e.num_frames] = e.features
    return Batch(
        input_ids=input_ids, attention_mask=mask, labels=labels, features=feats,
        frame_lengths=torch.tensor([e.num_frames for e in examples]),
        audio_starts=torch.tensor([e.audio_start for e in examples]),
        audio_tokens=torch.tensor([e.num_audio_tokens for e in examples]),
        teacher=_pad_targets(teacher) if teacher is not None else None,
        transcripts=[e.transcript_ids for e in examples], char_transcripts=[e.transcript_chars for e in examples],
        text_input_ids=text_ids, text_attention_mask=text_mask, text_labels=text_labels,
        frame_teacher=_pad_targets(frame_teacher) if frame_teacher is not None else None,
    )
