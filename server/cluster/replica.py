"""One model replica: its own engine and :class:`ChatService`, adapters loaded on first use.

Serve's model multiplexing routes each request to a replica that already holds its adapter (the
multiplexed model id is the adapter name); :meth:`ModelReplica._get_adapter` is the
``@serve.multiplexed`` loader, so a replica holds at most ``max_loras`` adapters and evicts the
least recently used one. Versions come from the cluster catalog (:mod:`server.cluster.catalog`):
a request carries the version the ingress saw, and a replica holding an older one loads the
current version first; running streams finish on the version they leased (the registry's own
hot swap). Ray is imported lazily: the launcher wraps this plain class in ``serve.deployment``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncGenerator, Awaitable, Callable

from server.adapter_admin import adapter_info, load_from_source
from server.cluster.catalog import CatalogEntry, ReplicaHolding
from server.cluster.wire import ReplicaHello, WireContext, WireError
from server.config import Settings
from server.context import RequestContext
from server.errors import APIError, Conflict, NotFound
from server.serving import ChatChunk, ChatJob
from server.state import ServerState

log = logging.getLogger("server.cluster")


class LoadedAdapter:
    """What the multiplexed loader returns; Serve calls ``__del__`` when it evicts the adapter."""

    def __init__(self, replica: "ModelReplica", name: str) -> None:
        self._replica = replica
        self._loop = asyncio.get_running_loop()
        self.name = name
        self._evicted = False

    def __del__(self) -> None:
        # Serve runs a sync __del__ in a thread on eviction; GC may call it again later.
        if self._evicted:
            return
        self._evicted = True
        try:
            asyncio.run_coroutine_threadsafe(self._replica._evict(self.name), self._loop)
        except RuntimeError:  # the loop is gone (replica shutting down): nothing left to free
            pass


class ModelReplica:
    """The model deployment's class (``serve.deployment`` is applied by the launcher)."""

    async def __init__(self, settings: Settings, catalog_name: str, namespace: str) -> None:
        import ray
        from ray import serve

        from server.logs import setup_logging
        from server.cluster.replica_metrics import serve_metrics
        from server.metrics import ServerMetrics, log_record
        from server.state import build_state

        setup_logging(settings.log_level, settings.log_format)
        self.settings = settings
        self.catalog = ray.get_actor(catalog_name, namespace=namespace)  # the AdapterCatalog actor
        context = serve.get_replica_context()
        self.replica_id = f"{context.deployment}-{context.replica_id.unique_id}"
        self.state: ServerState = await build_state(settings, preload=False)
        if settings.log_requests:
            self.state.service.observers.append(log_record)
        self._metrics_server = None
        if settings.replica_metrics_port is not None:
            metrics = ServerMetrics(settings.metrics_max_label_values)
            admission, engine = self.state.admission, self.state.engine
            metrics.bind(in_flight=lambda: admission.running, queued=lambda: admission.waiting,
                         engine_requests=engine.num_running)
            self.state.service.observers.append(metrics.observe)
            self._metrics_server = serve_metrics(settings.host, settings.replica_metrics_port + context.rank.local_rank,
                                                 metrics.render, self.replica_id)
        self.versions: dict[str, int] = {}  # adapter -> catalog version this replica serves
        self.loads = 0
        self._locks: dict[str, asyncio.Lock] = {}

        async def get_adapter(name: str) -> LoadedAdapter:
            await self._install(name, 0)
            return LoadedAdapter(self, name)

        self._get_adapter: Callable[[str], Awaitable[LoadedAdapter]] = serve.multiplexed(
            max_num_models_per_replica=settings.max_loras)(get_adapter)
        await self._report()
        log.info("model replica ready", extra={"replica": self.replica_id, "pid": os.getpid()})

    # ---- adapters -------------------------------------------------------------------------------

    async def _catalog(self, method: str, *args: object) -> object:
        return await getattr(self.catalog, method).remote(*args)

    def holding(self) -> ReplicaHolding:
        engine: dict[str, int] = {}
        for v in self.state.registry.live_versions():
            engine[v.name] = engine.get(v.name, 0) + 1
        return ReplicaHolding(replica=self.replica_id, pid=os.getpid(), adapters=dict(self.versions),
                              loads=self.loads, engine_versions=engine)

    async def _report(self) -> None:
        await self._catalog("report", self.holding())

    async def _install(self, name: str, min_version: int) -> int:
        """Make this replica serve ``name`` at the catalog's current version if it holds none or
        one older than ``min_version``; returns the catalog version it serves."""
        async with self._locks.setdefault(name, asyncio.Lock()):
            held = self.versions.get(name)
            if held is not None and held >= min_version and name in self.state.registry:
                return held
            entry: CatalogEntry | None = await self._catalog("get", name)  # type: ignore[assignment]
            if entry is None:
                raise NotFound(f"adapter '{name}' is not loaded; GET /v1/models lists the adapters you can use",
                               code="adapter_not_found", param="model")
            version, _ = await load_from_source(self.state.registry, self.state.adapter_cache, name, entry.source,
                                                trusted=True, sha256=entry.sha256)
            digest = version.path.name
            if not entry.digest:
                entry = await self._catalog("fill_digest", name, entry.version, digest) or entry  # type: ignore[assignment]
            if entry.digest and entry.digest != digest:
                await self.state.registry.unload(name)
                self.versions.pop(name, None)
                raise Conflict(f"adapter '{name}' version {entry.version}: its source now holds different files "
                               f"(digest {digest[:12]}, published {entry.digest[:12]}); replace it again",
                               code="adapter_source_changed")
            self.versions[name] = entry.version
            self.loads += 1
        await self._report()
        log.info("adapter installed on replica", extra={"replica": self.replica_id, "adapter": name,
                                                         "version": entry.version})
        return entry.version

    async def _evict(self, name: str) -> None:
        """LRU eviction by Serve: running streams finish on their lease, then the engine frees it."""
        async with self._locks.setdefault(name, asyncio.Lock()):
            self.versions.pop(name, None)
            if name in self.state.registry:
                await self.state.registry.unload(name)
        await self._report()

    async def publish(self, name: str, source: str, sha256: str | None, trusted: bool) -> dict:
        """``POST /v1/adapters`` on this replica: fetch, validate and load here first (so a bad
        source changes nothing anywhere), then number the new version in the catalog."""
        try:
            async with self._locks.setdefault(name, asyncio.Lock()):
                version, _ = await load_from_source(self.state.registry, self.state.adapter_cache, name, source,
                                                    trusted=trusted, sha256=sha256)
                entry: CatalogEntry = await self._catalog("publish", name, version.source,  # type: ignore[assignment]
                                                          version.path.name, sha256)
                self.versions[name] = entry.version
                self.loads += 1
            await self._report()
            await self._get_adapter(name)  # Serve now routes this adapter here
            info = adapter_info(version, self.state.registry, await self.state.engine.list_loras(), None,
                                previous_version=entry.version - 1 or None)
            return {"info": info.model_copy(update={"version": entry.version}).model_dump(),
                    "replica": self.replica_id}
        except APIError as e:
            return {"error": WireError.of(e), "replica": self.replica_id}

    # ---- requests -------------------------------------------------------------------------------

    async def generate(self, job: ChatJob, wire: WireContext) -> AsyncGenerator[ReplicaHello | ChatChunk | WireError, None]:
        """The service's chunks for one job, after a :class:`ReplicaHello`; a failure becomes a
        :class:`WireError` item (before or after ``Started``), so the ingress re-raises the same
        status and code. Cancelled by the ingress (client gone): closing ``run`` aborts the engine."""
        name = job.adapter or ""
        try:
            await self._get_adapter(name)
            version = await self._install(name, wire.min_version)
            chunks, first = await self._start(job, wire.context(), name, wire.min_version)
        except APIError as e:
            yield ReplicaHello(self.replica_id, None)
            yield WireError.of(e)
            return
        yield ReplicaHello(self.replica_id, self.versions.get(name, version))
        try:
            yield first
            async for chunk in chunks:
                yield chunk
        except APIError as e:
            yield WireError.of(e)
        finally:
            await chunks.aclose()
            if any(v.retired for v in self.state.registry.live_versions()):
                # An old version's last stream ended: once the engine dropped it, say so.
                await self.state.registry.wait_idle()
                await self._report()

    async def _start(self, job: ChatJob, ctx: RequestContext, name: str,
                     min_version: int) -> tuple[AsyncGenerator[ChatChunk, None], ChatChunk]:
        """``ChatService.run`` up to its first chunk. Serve's LRU may evict this request's adapter
        while it waits for admission (another adapter's first use needed the slot): then the
        adapter is loaded again and the request starts once more, instead of a spurious 404."""
        for attempt in range(2):
            chunks = self.state.service.run(job, ctx)
            try:
                return chunks, await anext(chunks)
            except NotFound as e:
                await chunks.aclose()
                if attempt or e.code != "adapter_not_found":
                    raise
                log.info("adapter evicted while the request waited; loading it again",
                         extra={"replica": self.replica_id, "adapter": name})
                await self._get_adapter(name)
                await self._install(name, min_version)
            except BaseException:
                await chunks.aclose()
                raise
        raise AssertionError("unreachable")

    async def __del__(self) -> None:
        """Serve's graceful stop (after the running requests finished): end the engine's
        processes with the replica, rather than leaving them to the OS."""
        from ray.exceptions import RayError

        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        self.state.frontend.close()
        await self.state.engine.shutdown()
        try:
            await self.catalog.forget_replica.remote(self.replica_id)
        except RayError:  # the catalog stops with the cluster: nothing left to tell
            pass

    async def check_health(self) -> None:
        """Serve's health check: a dead engine makes Serve replace this replica."""
        await self.state.engine.check_health()


