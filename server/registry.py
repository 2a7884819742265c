"""Adapters the server can serve: versions, engine LoRA ids, and atomic hot swap.

An adapter *version* is the unit of serving: one LoRA id in the engine plus one audio layer,
loaded and validated together. Replacing an adapter installs a new version under the same name;
requests hold a reference to the version they started with (``acquire``), so they finish on it,
and the old version leaves the engine when its last request ends. Nothing of a new version is
visible until all of it has loaded, so a failed load changes nothing that is serving.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from adapters.adapter import AuraAdapter, load_adapter
from adapters.base_model import BaseModelInfo
from adapters.validate import validate_adapter
from server.engine.base import Engine, LoraHandle
from server.errors import NotFound

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

    @property
    def trained(self) -> bool:
        return self.adapter.trained


class AdapterRegistry:
    def __init__(self, engine: Engine, base: BaseModelInfo, *, max_lora_rank: int,
                 device: str = "cpu") -> None:
        self.engine = engine
        self.base = base
        self.max_lora_rank = max_lora_rank
        self.device = device
        self._current: dict[str, AdapterVersion] = {}
        self._ids = itertools.count(1)
        self._versions: dict[str, int] = {}
        self._lock = asyncio.Lock()
        self.default: str | None = None

    def names(self) -> list[str]:
        return sorted(self._current)

    def versions(self) -> list[AdapterVersion]:
        return [self._current[n] for n in self.names()]

    def get(self, name: str) -> AdapterVersion:
        try:
            return self._current[name]
        except KeyError:
            raise NotFound(f"adapter '{name}' is not loaded; GET /v1/models lists the adapters you can use",
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
        if version.retired and version.active == 0:
            asyncio.get_running_loop().create_task(self._drop(version))

    async def load(self, name: str, path: str | Path, *, pin: bool = False, source: str | None = None) -> AdapterVersion:
        """Validate, load and install ``path`` as the new current version of ``name``."""
        path = Path(path).resolve()
        await asyncio.to_thread(validate_adapter, path, base=self.base, max_lora_rank=self.max_lora_rank)
        adapter = await asyncio.to_thread(load_adapter, path, name, device=self.device)
        async with self._lock:
            version_no = self._versions.get(name, 0) + 1
            lora = LoraHandle(name=name, lora_id=next(self._ids), path=path)
            # Load into the engine before it becomes visible, so the first request does not
            # stall its batch on a disk read, and a failure leaves the old version serving.
            await self.engine.add_lora(lora, pin=pin)
            new = AdapterVersion(name, version_no, adapter, lora, source or str(path), pinned=pin)
            old = self._current.get(name)
            self._current[name] = new
            self._versions[name] = version_no
            if self.default is None:
                self.default = name
        if old is not None:
            await self._retire(old)
        log.info("adapter loaded", extra={"adapter": name, "version": version_no, "lora_id": lora.lora_id,
                                          "trained": adapter.trained, "path": str(path)})
        return new

    async def unload(self, name: str) -> None:
        async with self._lock:
            old = self._current.pop(name, None)
            if old is None:
                raise NotFound(f"adapter '{name}' is not loaded", code="adapter_not_found")
            if self.default == name:
                self.default = next(iter(sorted(self._current)), None)
        await self._retire(old)
        log.info("adapter unloaded", extra={"adapter": name, "version": old.version})

    async def _retire(self, version: AdapterVersion) -> None:
        version.retired = True
        if version.active == 0:
            await self._drop(version)

    async def _drop(self, version: AdapterVersion) -> None:
        try:
            await self.engine.remove_lora(version.lora)
        except Exception:  # the engine may already have evicted it from its LRU
            log.debug("remove_lora failed", exc_info=True, extra={"adapter": version.name})


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
