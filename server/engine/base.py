"""The small interface the server uses to talk to an engine.

The server does everything audio-specific itself (decode, log-mel, the adapter's audio layer,
prompt assembly) and hands the engine a finished prompt: token ids, a mask of which positions
are real tokens, and the audio vectors for the others. Engines only generate.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import torch


class EngineDead(RuntimeError):
    """The engine has failed and cannot serve; the server answers 503 until restarted."""


@dataclass(frozen=True)
class SamplingOptions:
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class LoraHandle:
    """One adapter version as the engine knows it: a stable integer id per (name, version)."""

    name: str
    lora_id: int
    path: Path


@dataclass
class GenerationRequest:
    request_id: str
    token_ids: list[int]
    is_token_ids: list[bool]
    # (num_audio_positions, hidden) in the order the False positions of is_token_ids appear.
    audio_embeds: torch.Tensor
    sampling: SamplingOptions
    lora: LoraHandle | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class GenerationChunk:
    """New output since the previous chunk."""

    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0


class Engine(ABC):
    name: str
    tokenizer: object
    hidden_size: int

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def shutdown(self) -> None: ...

    @abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Yield chunks until finished. Closing the iterator early aborts the request."""

    @abstractmethod
    async def add_lora(self, lora: LoraHandle, *, pin: bool = False) -> None: ...

    @abstractmethod
    async def remove_lora(self, lora: LoraHandle) -> None: ...

    async def list_loras(self) -> set[int] | None:
        """LoRA ids the engine holds in memory (its host-side LRU cache), or None if it cannot tell.

        Used to show where an adapter is resident and to prove that unloading frees the engine's copy.
        """
        return None

    async def lora_load_counts(self) -> dict[str, int] | None:
        """LoRA loads the engine took prepared off its step loop (``off_loop``) and read inside it
        (``in_loop``), or None if it cannot tell. Shown on ``/metrics``."""
        return None

    @abstractmethod
    async def check_health(self) -> None:
        """Raise :class:`EngineDead` if the engine cannot serve."""

    def num_running(self) -> int:
        return 0
