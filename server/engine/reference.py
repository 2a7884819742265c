"""The reference engine: transformers + PEFT + the same prompt, in plain PyTorch.

It is the numerical oracle for the vLLM path (the parity tests compare the two), the engine the
trainer's model is checked against, and a way to serve on machines without vLLM. It runs one
request at a time on a worker thread; it is correct, not fast.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

import torch

from server.engine.base import (
    Engine, EngineDead, GenerationChunk, GenerationRequest, LoraHandle, SamplingOptions,
)

log = logging.getLogger(__name__)


def _adapter_key(lora: LoraHandle) -> str:
    return f"lora{lora.lora_id}"


class TextStream:
    """Incremental detokenisation with stop strings, held back while a character is incomplete."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.sent = 0
        self.stopped = False

    def push(self, token_id: int, *, is_eos: bool) -> str:
        if not is_eos:
            self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for s in self.stop:
            at = text.find(s)
            if at != -1:
                text = text[:at]
                self.stopped = True
        if text.endswith("\ufffd") and not (is_eos or self.stopped):
            return ""
        delta, self.sent = text[self.sent:], len(text)
        return delta


class ReferenceEngine(Engine):
    name = "reference"

    def __init__(self, *, model: str, tokenizer: Any, dtype: torch.dtype = torch.float32,
                 device: str = "cpu") -> None:
        from transformers import AutoModelForCausalLM

        self.model_path = model
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.dtype = dtype
        self._model = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(self.device).eval()
        self.hidden_size = self._model.config.hidden_size
        self._peft: Any = None
        self._loaded: dict[int, str] = {}
        self._lock = threading.Lock()
        self._aborted: set[str] = set()
        self._running = 0
        gen_cfg = getattr(self._model, "generation_config", None)
        eos = getattr(gen_cfg, "eos_token_id", None) or tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])

    async def start(self) -> None:
        return None

    async def shutdown(self) -> None:
        return None

    async def add_lora(self, lora: LoraHandle, *, pin: bool = False) -> None:
        await asyncio.to_thread(self._add_lora_sync, lora)

    def _add_lora_sync(self, lora: LoraHandle) -> None:
        from peft import PeftModel

        with self._lock:
            if lora.lora_id in self._loaded:
                return
            key = _adapter_key(lora)
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(self._model, str(lora.path), adapter_name=key)
                self._peft.eval()
            else:
                self._peft.load_adapter(str(lora.path), adapter_name=key)
            self._loaded[lora.lora_id] = key

    async def remove_lora(self, lora: LoraHandle) -> None:
        def _remove() -> None:
            with self._lock:
                key = self._loaded.pop(lora.lora_id, None)
                if key is None or self._peft is None:
                    return
                if self._loaded:
                    self._peft.delete_adapter(key)
                else:  # PEFT cannot delete its last adapter; strip the LoRA layers instead
                    self._model = self._peft.unload()
                    self._peft = None

        await asyncio.to_thread(_remove)

    async def list_loras(self) -> set[int] | None:
        return set(self._loaded)

    async def check_health(self) -> None:
        return None

    def num_running(self) -> int:
        return self._running

    def _inputs_embeds(self, model: Any, request: GenerationRequest) -> torch.Tensor:
        ids = torch.tensor([request.token_ids], device=self.device)
        embeds = model.get_input_embeddings()(ids)
        positions = [i for i, t in enumerate(request.is_token_ids) if not t]
        if positions:
            embeds[0, positions] = request.audio_embeds.to(self.device, embeds.dtype)
        return embeds

    @torch.inference_mode()
    def _run(self, request: GenerationRequest, emit) -> None:
        s: SamplingOptions = request.sampling
        gen = torch.Generator(device=self.device)
        if s.seed is not None:
            gen.manual_seed(s.seed)
        with self._lock:
            if request.lora is not None:
                if request.lora.lora_id not in self._loaded:
                    raise KeyError(f"adapter {request.lora.name} is not loaded")
                self._peft.set_adapter(self._loaded[request.lora.lora_id])
                model, ctx = self._peft, _nullctx()
            elif self._peft is not None:
                model, ctx = self._peft, self._peft.disable_adapter()
            else:
                model, ctx = self._model, _nullctx()
            with ctx:
                self._decode_loop(model, request, s, gen, emit)

    def _decode_loop(self, model: Any, request: GenerationRequest, s: SamplingOptions, gen, emit) -> None:
        stream = TextStream(self.tokenizer, s.stop)
        out = model(inputs_embeds=self._inputs_embeds(model, request), use_cache=True)
        past = out.past_key_values
        logits = out.logits[0, -1]
        n_out = 0
        n_prompt = len(request.token_ids)
        while True:
            if request.request_id in self._aborted:
                self._aborted.discard(request.request_id)
                emit(GenerationChunk([], "", "abort", n_prompt, n_out))
                return
            token = _sample(logits.float(), s, gen)
            n_out += 1
            is_eos = token in self.eos_ids
            delta = stream.push(token, is_eos=is_eos)
            finish = None
            if is_eos or stream.stopped:
                finish = "stop"
            elif n_out >= s.max_tokens:
                finish = "length"
            emit(GenerationChunk([token], delta, finish, n_prompt, n_out))
            if finish:
                return
            out = model(input_ids=torch.tensor([[token]], device=self.device), past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[0, -1]

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[GenerationChunk | BaseException] = asyncio.Queue()

        def emit(chunk: GenerationChunk) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, chunk)

        def work() -> None:
            try:
                self._run(request, emit)
            except BaseException as e:  # noqa: BLE001 - delivered to the caller, not lost in the thread
                loop.call_soon_threadsafe(queue.put_nowait, e)

        self._running += 1
        task = loop.run_in_executor(None, work)
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise EngineDead(f"reference engine failed: {item}") from item
                if item.finish_reason == "abort":
                    finished = True
                    return
                yield item
                if item.finish_reason is not None:
                    finished = True
                    return
        finally:
            if not finished:
                self._aborted.add(request.request_id)
            await asyncio.shield(task)
            self._aborted.discard(request.request_id)
            self._running -= 1


class _nullctx:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _sample(logits: torch.Tensor, s: SamplingOptions, gen: torch.Generator) -> int:
    if s.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / s.temperature, dim=-1)
    if s.top_p < 1.0:
        sorted_p, idx = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < s.top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(0, idx, sorted_p)
        probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=gen))
