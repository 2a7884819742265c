"""vLLM's AsyncLLM behind the engine interface.

Each request goes in as an embeds prompt with ``prompt_token_ids`` + ``prompt_is_token_ids``: text
positions use the model's own embedding (and stay eligible for prefix caching by token id),
audio positions take the vectors the server computed with the request's adapter. The LoRA part
of the adapter rides along as a ``LoRARequest``, so requests for different adapters share
batches through vLLM's multi-LoRA kernels.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import torch

from server.engine import lora_prepare
from server.engine.base import (
    Engine, EngineDead, GenerationChunk, GenerationRequest, LoraHandle,
)

log = logging.getLogger(__name__)

CPU_KV_BLOCK_SIZE = 32
CPU_MAX_NUM_BATCHED_TOKENS = 256
LORA_PREPARE_TIMEOUT_S = 120.0  # then add_lora reads the adapter in the step loop, as vLLM does by default


class VLLMEngine(Engine):
    name = "vllm"

    def __init__(self, *, model: str, tokenizer: Any, hidden_size: int, dtype: str = "auto",
                 max_model_len: int = 2048, max_num_seqs: int = 64, max_lora_rank: int = 64,
                 max_loras: int = 4, max_cpu_loras: int | None = None, enable_prefix_caching: bool = True,
                 gpu_memory_utilization: float = 0.85, cpu_kv_cache_gib: float = 1.0,
                 enforce_eager: bool = True, disable_log_stats: bool = False, seed: int = 0,
                 lora_target_modules: list[str] | None = None, enable_lora: bool = True,
                 cpu_lora_kernel: str = "segmented", max_num_batched_tokens: int | None = None,
                 block_size: int | None = None, progress_bars: bool = False) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.hidden_size = hidden_size
        self._args = dict(
            model=model, dtype=dtype, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
            enable_lora=enable_lora, enable_prompt_embeds=True,
            enable_prefix_caching=enable_prefix_caching,
            gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
            disable_log_stats=disable_log_stats, seed=seed,
            # Tokens per engine step: long prefills are chunked to it, so decodes keep flowing
            # while a burst of prompts is prefilled (None: vLLM's default).
            max_num_batched_tokens=max_num_batched_tokens,
            block_size=block_size,
            # The weight-loading progress bar is raw stderr output; shown with --log-level debug.
            use_tqdm_on_load=progress_bars,
        )
        if enable_lora:
            # Restricting LoRA to the linear layers keeps vLLM from wrapping the token embedding
            # with a LoRA layer; that wrapper indexes the whole batch's tokens and breaks when only
            # some positions are token ids (mixed prompt_embeds). AuRA never adapts embeddings.
            self._args.update(max_lora_rank=max_lora_rank, max_loras=max_loras, max_cpu_loras=max_cpu_loras,
                              lora_target_modules=lora_target_modules,
                              # Adds the methods that read and pack a LoRA off the step loop
                              # (server/engine/lora_prepare.py) to vLLM's worker.
                              worker_extension_cls=lora_prepare.EXTENSION_QUALNAME)
        # Read and pack each LoRA off the step loop before add_lora (server/engine/lora_prepare.py);
        # bench/lora_load_stall.py turns it off between loads to measure what it saves.
        self.prepare_loras_off_loop = True
        self._cpu_lora_kernel = cpu_lora_kernel
        self._cpu_kv_cache_gib = cpu_kv_cache_gib
        self._llm: Any = None
        self._model_dtype: torch.dtype = torch.float32

    async def start(self) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        if current_platform.is_cpu():
            # The CPU backend reads its KV cache size from the environment (GiB); its default
            # derives from gpu_memory_utilization of the whole NUMA node and fails on small hosts.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(round(self._cpu_kv_cache_gib)))))
            self._select_cpu_lora_kernel()
            if self._args["block_size"] is None:
                # The KV block is the unit prefix caching shares, and vLLM's CPU default (128)
                # is longer than a whole AuRA prompt: nothing would ever be reused. 32 is the
                # smallest block the CPU attention kernel takes.
                self._args["block_size"] = CPU_KV_BLOCK_SIZE
            if self._args["max_num_batched_tokens"] is None:
                # Small steps: a burst's prefills are chunked (~4 prompts a step), so early
                # requests start decoding while later ones prefill, instead of every request
                # waiting for one step holding all of them (bench/lora_overhead.py, c=16:
                # TTFT p50 0.45x, p90 0.70x, output tok/s 1.19x vs vLLM's 2048).
                self._args["max_num_batched_tokens"] = max(CPU_MAX_NUM_BATCHED_TOKENS, self._args["max_num_seqs"])
        self._arm_parent_watch()
        args = AsyncEngineArgs(**{k: v for k, v in self._args.items() if v is not None})
        self._llm = AsyncLLM.from_engine_args(args)
        self._model_dtype = self._llm.model_config.dtype
        if self._args["enable_lora"]:
            await self.lora_load_counts()  # installs the hand-over now, so every later load is counted
        log.info("vllm engine started", extra={"model": self.model, "dtype": str(self._model_dtype)})

    def _select_cpu_lora_kernel(self) -> None:
        """Tell the LoRA plugin (loaded by vLLM in each of its processes, which inherit this
        environment) which CPU kernel to use, and warn when the plugin is not installed."""
        from importlib.metadata import entry_points

        from server.engine.cpu_lora_plugin import ENTRY_POINT_NAME, ENV_VAR, SEGMENTED

        os.environ[ENV_VAR] = self._cpu_lora_kernel
        if self._args["enable_lora"] and self._cpu_lora_kernel == SEGMENTED:
            names = {ep.name for ep in entry_points(group="vllm.general_plugins")}
            if ENTRY_POINT_NAME not in names:
                log.warning("the CPU LoRA plugin is not installed (reinstall aura-serve): vLLM's slower "
                            "per-token LoRA path will run", extra={"entry_point": ENTRY_POINT_NAME})

    def _arm_parent_watch(self) -> None:
        """Name this process as the one vLLM's engine process must not outlive (the parent-watch
        plugin, loaded in vLLM's processes, reads it), and warn when the plugin is not installed."""
        from importlib.metadata import entry_points

        from server.engine import parent_watch

        os.environ[parent_watch.ENV_VAR] = str(os.getpid())
        names = {ep.name for ep in entry_points(group="vllm.general_plugins")}
        if parent_watch.ENTRY_POINT_NAME not in names:
            log.warning("the parent-watch plugin is not installed (reinstall aura-serve): if this process is "
                        "killed, vLLM's engine process will outlive it",
                        extra={"entry_point": parent_watch.ENTRY_POINT_NAME})

    async def shutdown(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None

    def _lora_request(self, lora: LoraHandle | None) -> Any:
        if lora is None:
            return None
        from vllm.lora.request import LoRARequest

        return LoRARequest(lora_name=f"{lora.name}@{lora.lora_id}", lora_int_id=lora.lora_id, lora_path=str(lora.path))

    def _prompt(self, request: GenerationRequest) -> dict[str, Any]:
        """An engine input built directly (no renderer pass: the prompt is already tokenised)."""
        from vllm.inputs.engine import embeds_input

        embeds = torch.zeros(len(request.token_ids), self.hidden_size, dtype=self._model_dtype)
        audio_positions = [i for i, is_tok in enumerate(request.is_token_ids) if not is_tok]
        if audio_positions:
            embeds[audio_positions] = request.audio_embeds.to(self._model_dtype)
        return embeds_input(embeds, prompt_token_ids=request.token_ids, is_token_ids=request.is_token_ids)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        if self._llm is None or self._llm.errored:
            raise EngineDead("the vLLM engine is not running")
        s = request.sampling
        params = SamplingParams(
            max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p, seed=s.seed,
            stop=list(s.stop) or None, output_kind=RequestOutputKind.DELTA,
        )
        finished = False
        n_out = 0
        try:
            async for out in self._llm.generate(
                self._prompt(request), params, request.request_id, lora_request=self._lora_request(request.lora)
            ):
                completion = out.outputs[0]
                n_out += len(completion.token_ids)
                finished = out.finished
                yield GenerationChunk(
                    token_ids=list(completion.token_ids), text=completion.text,
                    finish_reason=completion.finish_reason if out.finished else None,
                    num_prompt_tokens=len(request.token_ids), num_output_tokens=n_out,
                )
        except Exception as e:
            if self._llm is not None and self._llm.errored:
                raise EngineDead(f"the vLLM engine failed: {e}") from e
            raise
        finally:
            if not finished and self._llm is not None:
                await self._llm.abort(request.request_id)

    async def add_lora(self, lora: LoraHandle, *, pin: bool = False) -> None:
        if self.prepare_loras_off_loop:
            await self._prepare_lora(lora)
        await self._llm.add_lora(self._lora_request(lora))  # registers it in the host cache and a slot
        if pin:
            try:
                await self._llm.pin_lora(lora.lora_id)
            except BaseException:  # do not leave a half-installed version in the engine
                await self._llm.remove_lora(lora.lora_id)
                raise

    async def _prepare_lora(self, lora: LoraHandle) -> None:
        """Have vLLM's workers read, validate and pack the LoRA in a thread, and wait until they did.

        The step loop keeps running meanwhile (each status poll is a small utility call between
        steps). A failed or slow preparation is not an error here: ``add_lora`` then loads in the
        loop as vLLM does by default, and reports a bad adapter the way it always did.
        """
        rpc = self._llm.collective_rpc
        started = await rpc(lora_prepare.PREPARE, args=(f"{lora.name}@{lora.lora_id}", lora.lora_id, str(lora.path)))
        if not all(started):
            return
        deadline = time.monotonic() + LORA_PREPARE_TIMEOUT_S
        pause = 0.005
        while time.monotonic() < deadline:
            states = set(await rpc(lora_prepare.STATUS, args=(lora.lora_id,)))
            if states == {lora_prepare.READY}:
                return
            if states & {lora_prepare.FAILED, lora_prepare.UNKNOWN}:
                log.debug("LoRA preparation did not finish; vLLM loads it in the step loop",
                          extra={"adapter": lora.name, "states": sorted(states)})
                return
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.05)

    async def lora_load_counts(self) -> dict[str, int] | None:
        """LoRA loads the engine's workers took prepared (``off_loop``) or read in the step loop (``in_loop``)."""
        if self._llm is None or not self._args["enable_lora"]:
            return None
        per_worker = await self._llm.collective_rpc(lora_prepare.COUNTS)
        return {k: sum(c[k] for c in per_worker) for k in ("off_loop", "in_loop")}

    async def remove_lora(self, lora: LoraHandle) -> None:
        await self._llm.remove_lora(lora.lora_id)

    async def list_loras(self) -> set[int] | None:
        if not self._args["enable_lora"]:
            return set()  # LoRA off (e.g. the adapter is merged into the weights): no slots to list
        return set(await self._llm.list_loras())

    async def check_health(self) -> None:
        if self._llm is None:
            raise EngineDead("the vLLM engine is not running")
        try:
            await self._llm.check_health()
        except Exception as e:
            raise EngineDead(f"the vLLM engine failed: {e}") from e

    def num_running(self) -> int:
        return self._llm.get_num_unfinished_requests() if self._llm is not None else 0
