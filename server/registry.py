"""Adapters the server can serve: versions, engine LoRA ids, and atomic hot swap.

An adapter *version* is the unit of serving: one LoRA id in the engine plus one audio layer,
loaded and validated together. Replacing an adapter installs a new version under the same name;
requests hold a reference to the version they started with (``lease``), so they finish on it,
and the old version leaves the engine (``remove_lora``) when its last request ends. Nothing of a
new version is visible until all of it has loaded, so a failed load changes nothing serving.

Loads of one name are serialised end to end (fetch, validate, engine load, swap) by a per-name
lock, so two concurrent replacements install in the order they arrived and never interleave;
loads of different names proceed in parallel except for the short engine step.

Each version's files must never change while it is alive (the engine re-reads them whenever its
LRU evicted the LoRA and it is used again); the server guarantees that by loading from the
content-addressed adapter cache (``server/sources.py``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from adapters.adapter import AuraAdapter, load_adapter
from adapters.base_model import BaseModelInfo
from adapters.merge import lora_digest
from adapters.validate import validate_adapter
from server.engine.base import Engine, LoraHandle
from server.errors import Conflict, NotFound

log = logging.getLogger(__name__)


@dataclass
class AdapterVersion:
    name: str
    version: int
    adapter: AuraAdapter
    lora: LoraHandle
    source: str
    pinned: bool = False
    loaded_at: float = field(default_factory=time.time)
    active: int = 0
    retired: bool = False
    dropped: bool = False
    # The LoRA is merged into the engine's weights (--merge-adapter): the engine gets no LoRA request.
    merged: bool = False

    @property
    def engine_lora(self) -> LoraHandle | None:
        """What a request hands the engine: the LoRA version, or None when it is in the weights."""
        return None if self.merged else self.lora

    @property
    def trained(self) -> bool:
        return self.adapter.trained

    @property
    def path(self) -> Path:
        return self.lora.path

    @property
    def status(self) -> str:
        """serving: the current version; draining: replaced or unloaded, finishing its requests."""
        if self.dropped:
            return "unloaded"
        return "draining" if self.retired else "serving"


@dataclass(frozen=True)
class MergedAdapter:
    """The one adapter whose LoRA the engine's weights already hold (``--merge-adapter``)."""

    name: str
    lora_sha256: str  # adapters.merge.lora_digest of the folder that was merged


class AdapterRegistry:
    def __init__(self, engine: Engine, base: BaseModelInfo, *, max_lora_rank: int,
                 device: str = "cpu", max_pinned: int | None = None, merged: MergedAdapter | None = None) -> None:
        self.engine = engine
        # Set: this server serves exactly that adapter, merged into the base weights at start.
        # Its LoRA can change only with the weights, i.e. by a restart: loading any other
        # adapter, replacing it or unloading it is refused (409) instead of silently serving
        # weights that no longer match the registry.
        self.merged = merged
        self.base = base
        self.max_lora_rank = max_lora_rank
        self.device = device
        # vLLM raises once every GPU slot is pinned; keep at least one slot for unpinned adapters.
        self.max_pinned = max_pinned
        self._current: dict[str, AdapterVersion] = {}
        self._live: dict[int, AdapterVersion] = {}  # lora_id -> every version still in the engine
        self._ids = itertools.count(1)
        self._versions: dict[str, int] = {}
        self._engine_lock = asyncio.Lock()
        self._name_locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task] = set()
        self.default: str | None = None

    def names(self) -> list[str]:
        return sorted(self._current)

    def versions(self) -> list[AdapterVersion]:
        return [self._current[n] for n in self.names()]

    def live_versions(self) -> list[AdapterVersion]:
        """Current and draining versions: everything the engine still holds for us."""
        return sorted(self._live.values(), key=lambda v: (v.name, v.version))

    def live_paths(self) -> set[Path]:
        return {v.path for v in self._live.values()}

    def get(self, name: str) -> AdapterVersion:
        try:
            return self._current[name]
        except KeyError:
            only = (f" (this server serves only '{self.merged.name}', merged into its weights)"
                    if self.merged is not None else "")
            raise NotFound(f"adapter '{name}' is not loaded{only}; GET /v1/models lists the adapters you can use",
                           code="adapter_not_found", param="model") from None

    def __contains__(self, name: str) -> bool:
        return name in self._current

    def lease(self, name: str) -> "Lease":
        """Hold the current version of ``name`` for one request; call ``release()`` when done."""
        version = self.get(name)
        version.active += 1
        return Lease(self, version)

    def _release(self, version: AdapterVersion) -> None:
        version.active -= 1
        if version.retired and version.active == 0 and not version.dropped:
            # Keep a reference: the loop only holds tasks weakly, and a collected task would
            # leave the LoRA in the engine forever.
            task = asyncio.get_running_loop().create_task(self._drop(version))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _name_lock(self, name: str) -> asyncio.Lock:
        return self._name_locks.setdefault(name, asyncio.Lock())

    def _pinned_count(self) -> int:
        return sum(1 for v in self._live.values() if v.pinned)

    async def load(self, name: str, path: str | Path | None = None, *, pin: bool = False, source: str | None = None,
                   fetch: Callable[[], Awaitable[Path]] | None = None) -> AdapterVersion:
        """Validate, load and install an adapter folder as the new current version of ``name``.

        ``fetch`` (instead of ``path``) produces the folder under the name's lock, so a slow
        download cannot be overtaken by a later request for the same name.
        """
        if self.merged is not None:
            self._check_merged_name(name)  # before any fetch: a refused load costs nothing
        async with self._name_lock(name):
            if self.merged is not None:
                self._check_merged_name(name)
            if fetch is not None:
                path = await fetch()
            if path is None:
                raise ValueError("load() needs a path or a fetch function")
            path = Path(path).resolve()
            await asyncio.to_thread(validate_adapter, path, base=self.base, max_lora_rank=self.max_lora_rank)
            if self.merged is not None:
                await self._check_merged_digest(name, path)
            adapter = await asyncio.to_thread(load_adapter, path, name, device=self.device)
            old = self._current.get(name)
            async with self._engine_lock:
                if pin and self.max_pinned is not None and self._pinned_count() >= self.max_pinned:
                    raise Conflict(
                        f"cannot pin '{name}': {self._pinned_count()} adapter versions are pinned and this server "
                        f"allows {self.max_pinned} (max_loras - 1, so unpinned adapters keep a slot); unpin or "
                        "unload one, or raise --max-loras", code="too_many_pinned")
                version_no = self._versions.get(name, 0) + 1
                lora = LoraHandle(name=name, lora_id=next(self._ids), path=path)
                merged = self.merged is not None
                if not merged:
                    # Load into the engine before it becomes visible, so the first request does not
                    # stall its batch on a disk read, and a failure leaves the old version serving.
                    await self.engine.add_lora(lora, pin=pin)
                new = AdapterVersion(name, version_no, adapter, lora, source or str(path), pinned=pin and not merged,
                                     merged=merged)
                self._live[lora.lora_id] = new
                self._current[name] = new  # the swap: one assignment, no await in between
                self._versions[name] = version_no
                if self.default is None:
                    self.default = name
            if old is not None:
                await self._retire(old)
        log.info("adapter loaded", extra={"adapter": name, "version": version_no, "lora_id": lora.lora_id,
                                          "trained": adapter.trained, "pinned": new.pinned, "merged": new.merged, "source": new.source,
                                          "replaced": old.version if old else None})
        return new

    def _check_merged_name(self, name: str) -> None:
        assert self.merged is not None
        if name != self.merged.name:
            raise Conflict(
                f"this server serves only the adapter '{self.merged.name}', merged into the base weights "
                f"(--merge-adapter); '{name}' cannot be loaded beside it. Serve other adapters from a server "
                "started without --merge-adapter", code="merged_adapter_only", param="name")
        if name in self._current:
            raise Conflict(
                f"'{name}' is merged into the engine's weights at start and cannot be replaced while serving; "
                "restart the server with the new version (it is merged again at start), or serve it from a "
                "server started without --merge-adapter to hot-swap it", code="merged_adapter_replace",
                param="name")

    async def _check_merged_digest(self, name: str, path: Path) -> None:
        assert self.merged is not None
        if await asyncio.to_thread(lora_digest, path) != self.merged.lora_sha256:
            raise Conflict(f"the LoRA of this '{name}' differs from the one merged into the engine's weights at "
                           "start; restart the server to serve it", code="merged_adapter_mismatch", param="source")

    async def unload(self, name: str) -> AdapterVersion:
        if self.merged is not None and name == self.merged.name and name in self._current:
            raise Conflict(f"'{name}' is merged into the engine's weights and is the only adapter this server "
                           "serves; it cannot be unloaded (stop the server instead)", code="merged_adapter_unload")
        async with self._name_lock(name):
            old = self._current.pop(name, None)
            if old is None:
                raise NotFound(f"adapter '{name}' is not loaded", code="adapter_not_found")
            if self.default == name:
                self.default = next(iter(sorted(self._current)), None)
            await self._retire(old)
        log.info("adapter unloaded", extra={"adapter": name, "version": old.version,
                                            "draining_requests": old.active})
        return old

    async def _retire(self, version: AdapterVersion) -> None:
        version.retired = True
        if version.active == 0:
            await self._drop(version)

    async def _drop(self, version: AdapterVersion) -> None:
        if version.dropped:
            return
        version.dropped = True
        self._live.pop(version.lora.lora_id, None)
        if version.merged:
            return
        try:
            async with self._engine_lock:
                await self.engine.remove_lora(version.lora)
        except Exception:  # the engine may already have evicted it from its LRU
            log.debug("remove_lora failed", exc_info=True, extra={"adapter": version.name})

    async def wait_idle(self) -> None:
        """Wait for pending engine removals (tests and shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


class Lease:
    """A request's hold on one adapter version; releasing twice is harmless."""

    def __init__(self, registry: AdapterRegistry, version: AdapterVersion) -> None:
        self._registry = registry
        self.version = version
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._registry._release(self.version)
