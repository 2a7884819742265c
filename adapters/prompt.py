"""Prompt layout shared by the trainer and the server: chat template + audio spans.

What is trained is what is served: both sides call :func:`build_prompt`, so the position of the
audio vectors, the markers around them and the template tokens are identical by construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict

# Never produced by a tokenizer's chat template on its own; marks where audio goes while the
# template renders, and is split out before tokenizing.
_SENTINEL = "\u2063AURA_AUDIO_{}\u2063"


class PromptLayout(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    template: Literal["chat"] = "chat"
    audio_start: str = "<audio>"
    audio_end: str = "</audio>"
    # None keeps the tokenizer template's own default system prompt.
    system_prompt: str | None = None


@dataclass(frozen=True)
class AudioPart:
    num_tokens: int


@dataclass(frozen=True)
class TextPart:
    text: str


Part = Union[AudioPart, TextPart]


@dataclass(frozen=True)
class Turn:
    role: str
    parts: tuple[Part, ...]


@dataclass
class PromptTokens:
    """Token ids for the whole prompt; audio positions hold ``placeholder_id``."""

    token_ids: list[int]
    audio_spans: list[tuple[int, int]] = field(default_factory=list)  # (start, length)

    @property
    def is_token_ids(self) -> list[bool]:
        mask = [True] * len(self.token_ids)
        for start, length in self.audio_spans:
            for i in range(start, start + length):
                mask[i] = False
        return mask

    @property
    def num_audio_tokens(self) -> int:
        return sum(n for _, n in self.audio_spans)


# What an adapter is asked when it should transcribe, unless its training recorded another prompt
# (``aura_config.json`` -> ``training.transcribe_prompt``); the trainer's default too.
DEFAULT_TRANSCRIBE_PROMPT = "Transcribe the audio."


def user_turn(num_audio_tokens: int, text: str | None = None) -> Turn:
    """The single-turn layout used for training and for multipart requests: audio, then text."""
    parts: list[Part] = [AudioPart(num_audio_tokens)]
    if text:
        parts.append(TextPart(text))
    return Turn("user", tuple(parts))


def build_prompt(
    tokenizer: Any,
    layout: PromptLayout,
    turns: list[Turn],
    *,
    placeholder_id: int | None = None,
    add_generation_prompt: bool = True,
) -> PromptTokens:
    messages: list[dict[str, str]] = []
    if layout.system_prompt is not None and not any(t.role == "system" for t in turns):
        messages.append({"role": "system", "content": layout.system_prompt})
    audio_sizes: list[int] = []
    for turn in turns:
        pieces: list[str] = []
        for part in turn.parts:
            if isinstance(part, AudioPart):
                pieces.append(layout.audio_start + _SENTINEL.format(len(audio_sizes)) + layout.audio_end)
                audio_sizes.append(part.num_tokens)
            else:
                pieces.append(part.text)
        messages.append({"role": turn.role, "content": "\n".join(pieces)})
    rendered: str = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    if placeholder_id is None:
        placeholder_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    token_ids: list[int] = []
    spans: list[tuple[int, int]] = []
    rest = rendered
    for i, size in enumerate(audio_sizes):
        marker = _SENTINEL.format(i)
        before, found, rest = rest.partition(marker)
        if not found:
            raise ValueError("the chat template dropped an audio part; it cannot be used with AuRA")
        token_ids += tokenizer.encode(before, add_special_tokens=False)
        spans.append((len(token_ids), size))
        token_ids += [placeholder_id] * size
    token_ids += tokenizer.encode(rest, add_special_tokens=False)
    return PromptTokens(token_ids=token_ids, audio_spans=spans)


def end_of_turn_id(tokenizer: Any) -> int:
    """The token that closes an assistant turn in the model's own chat template (``<|im_end|>``
    for ChatML): what an adapter must learn to emit and what generation stops on.

    Read from the template, not from ``eos_token``: which special token a tokenizer calls "eos"
    depends on who converted it (one GGUF conversion named ``<|im_start|>``, and an adapter trained
    against it learned to end its answers by opening a new turn). ``eos_token`` is the fallback
    for templates that close a turn with no special token.
    """
    marker = "AURA_END_OF_TURN_PROBE"
    try:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False
        )
    except Exception:  # noqa: BLE001 - a template that refuses this conversation: use eos
        rendered = ""
    _, found, after = str(rendered).partition(marker)
    ids = tokenizer.encode(after, add_special_tokens=False) if found and after else []
    if ids and ids[0] in set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {})):
        return int(ids[0])
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer's chat template closes turns with no special token and it has no eos token: "
                         "an adapter could not learn to stop")
    return int(tokenizer.eos_token_id)
