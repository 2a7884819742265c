"""vLLM worker extension: read and prepare a LoRA off the engine's step loop.

vLLM loads a LoRA inside its step loop: ``add_lora`` is a utility call the engine core runs
between steps, and it reads the adapter's files, builds every layer's tensors and packs them
(q/k/v into qkv, gate/up) before the next step may run; a request for an adapter that is not in
the host cache does the same work at the start of its step. Every other stream waits for it.

This class is vLLM's own extension point for worker methods (``worker_extension_cls``; the
engine names it when LoRA is on): the server calls ``aura_prepare_lora`` through
``collective_rpc``, which returns at once while a thread of the worker's process does the read,
parse, validation and packing with vLLM's own code (``WorkerLoRAManager._load_adapter`` and
``LoRAModelManager._create_merged_loras_inplace``); the server polls ``aura_lora_prepare_status``
until it is done and only then sends ``add_lora``. The worker's ``_load_adapter`` is wrapped
(on this worker's manager instance; the installed vLLM is not edited) to hand over the prepared
model when one is waiting for that id and path, so the step loop only registers it and copies it
into a slot. Packing an already packed model is a no-op in vLLM, so the handed-over model goes
through vLLM's usual add path unchanged.

What stays in the step loop: copying the weights into the engine's LoRA slot (``activate``),
which must not race with a running forward pass. ``aura_lora_load_counts`` says how many loads
were handed over and how many still ran in the loop (host-cache misses), for ``/metrics``.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.request import LoRARequest
    from vllm.lora.worker_manager import WorkerLoRAManager

log = logging.getLogger(__name__)

EXTENSION_QUALNAME = "server.engine.lora_prepare.LoRAPrepareExtension"
PREPARE = "aura_prepare_lora"
STATUS = "aura_lora_prepare_status"
COUNTS = "aura_lora_load_counts"
READY, PENDING, FAILED, UNKNOWN = "ready", "pending", "failed", "unknown"
MAX_WAITING = 8  # prepared models not yet handed over; the oldest are dropped beyond it


class _Prepared:
    """Prepared LoRA models of one worker, keyed by LoRA id, and the load counts."""

    def __init__(self, manager: WorkerLoRAManager) -> None:
        self.manager = manager
        self.lock = threading.Lock()
        self.jobs: OrderedDict[int, tuple[str, Future[LoRAModel]]] = OrderedDict()
        # One thread: loads are serialised, so a burst of swaps never takes both cores.
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aura-lora-prepare")
        self.off_loop = 0
        self.in_loop = 0
        loop_load: Callable[[LoRARequest], LoRAModel] = manager._load_adapter
        self.loop_load = loop_load
        manager._load_adapter = self.load_in_loop  # type: ignore[method-assign]

    def prepare(self, request: LoRARequest) -> None:
        with self.lock:
            self.jobs.pop(request.lora_int_id, None)
            self.jobs[request.lora_int_id] = (request.lora_path, self.pool.submit(self._build, request))
            while len(self.jobs) > MAX_WAITING:
                self.jobs.popitem(last=False)

    def _build(self, request: LoRARequest) -> LoRAModel:
        try:
            lora = self.loop_load(request)  # vLLM's own read + validation
            self.manager._adapter_manager._create_merged_loras_inplace(lora)  # packing; repeated later as a no-op
        except Exception:  # add_lora then loads it in the loop and reports the error the usual way
            log.debug("preparing LoRA %s failed", request.lora_int_id, exc_info=True)
            raise
        return lora

    def status(self, lora_id: int) -> str:
        with self.lock:
            job = self.jobs.get(lora_id)
        if job is None:
            return UNKNOWN
        future = job[1]
        if not future.done():
            return PENDING
        return FAILED if future.exception() is not None else READY

    def load_in_loop(self, request: LoRARequest) -> LoRAModel:
        """Replaces the manager's ``_load_adapter``: a prepared model if one waits, else vLLM's read."""
        with self.lock:
            job = self.jobs.get(request.lora_int_id)
            usable = job is not None and job[0] == request.lora_path and job[1].done() and job[1].exception() is None
            if job is not None and (usable or job[1].done()):
                del self.jobs[request.lora_int_id]
        if usable:
            assert job is not None
            self.off_loop += 1
            return job[1].result()
        self.in_loop += 1
        return self.loop_load(request)


class LoRAPrepareExtension:
    """Methods added to vLLM's worker class (``worker_extension_cls``), called by ``collective_rpc``."""

    _aura_prepared: _Prepared | None = None

    def _aura_store(self) -> _Prepared | None:
        if self._aura_prepared is None:
            manager = getattr(getattr(self, "model_runner", None), "lora_manager", None)
            if manager is None:
                return None  # LoRA off, or a worker without a LoRA manager
            self._aura_prepared = _Prepared(manager)
        return self._aura_prepared

    def aura_prepare_lora(self, name: str, lora_id: int, path: str) -> bool:
        """Start reading and packing a LoRA in a background thread; False if this worker has no LoRA."""
        from vllm.lora.request import LoRARequest

        store = self._aura_store()
        if store is None:
            return False
        store.prepare(LoRARequest(lora_name=name, lora_int_id=lora_id, lora_path=path))
        return True

    def aura_lora_prepare_status(self, lora_id: int) -> str:
        store = self._aura_store()
        return UNKNOWN if store is None else store.status(lora_id)

    def aura_lora_load_counts(self) -> dict[str, int]:
        """LoRA loads handed over prepared (``off_loop``) and read inside the step loop (``in_loop``)."""
        store = self._aura_store()
        if store is None:
            return {"off_loop": 0, "in_loop": 0}
        return {"off_loop": store.off_loop, "in_loop": store.in_loop}
