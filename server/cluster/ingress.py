"""The Ray Serve ingress: the single server's HTTP API in front of the model replicas.

It runs the same routes as ``aura serve`` (``server/routes/chat.py``, ``transcriptions.py``: the
door, parsing, SSE rendering and error shapes are not re-implemented) with a
:class:`RemoteChatService` in place of :class:`server.serving.ChatService`: auth, admission and
the adapter's catalog version are settled here, then the job goes to a model replica through a
``DeploymentHandle`` with ``multiplexed_model_id=<adapter>``, so Serve picks a replica that
already holds the adapter. The replica streams back the service's own chunks; a replica that
dies mid-stream ends the stream with an SSE error event (``replica_failed``), never a hang.
Adapter management and listing go to the cluster catalog (:mod:`server.cluster.catalog`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.admission import AdmissionController
from server.app import add_error_handlers
from server.cluster.catalog import CatalogEntry, ClusterAdapterList
from server.cluster.wire import ReplicaHello, WireContext, WireError
from server.config import Settings
from server.context import RequestContext
from server.errors import BadRequest, NotFound, ServiceUnavailable
from server.metrics import ObservabilityMiddleware, ServerMetrics
from server.protocol import AdapterDeleted, AdapterInfo, AdapterLoadRequest, ModelCard, ModelList, error_responses
from server.routes import chat, transcriptions
from server.routes import metrics as metrics_route
from server.serving import ChatChunk, ChatJob
from server.tenancy import Principal, Tenancy, authenticate, load_config

log = logging.getLogger("server.cluster")

REPLICA_HEADER = "x-aura-replica"
# The replica that answered the current request, written by RemoteChatService.run and read by
# ReplicaHeaderMiddleware when the response starts (a list: the middleware owns it, the route fills it).
_answered_by: ContextVar[list[str] | None] = ContextVar("aura_answered_by", default=None)


class ReplicaHeaderMiddleware:
    """``X-Aura-Replica: <replica>`` on every response a model replica took part in (pure ASGI,
    so streaming responses are not buffered)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        holder: list[str] = []
        token = _answered_by.set(holder)

        async def send_with_replica(message: Message) -> None:
            if message["type"] == "http.response.start" and holder:
                message = {**message, "headers": [*message.get("headers", ()),
                                                  (REPLICA_HEADER.encode(), holder[-1].encode("latin-1"))]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_replica)
        finally:
            _answered_by.reset(token)


def replica_failed(e: BaseException) -> ServiceUnavailable:
    return ServiceUnavailable(f"the model replica serving this request failed ({type(e).__name__}); retry: "
                              "Serve restarts it and routes new requests to the others", code="replica_failed")


class RemoteChatService:
    """What the chat routes need of :class:`server.serving.ChatService` (``settings``,
    ``admission``, ``check_accepting``, ``run``), answered by a model replica."""

    def __init__(self, settings: Settings, model: object, catalog: object, model_name: str) -> None:
        self.settings = settings
        self.model = model  # DeploymentHandle of the model deployment
        self.catalog = catalog  # ActorHandle of the AdapterCatalog
        self.model_name = model_name
        self.admission = AdmissionController.from_settings(settings)

    async def check_accepting(self) -> None:
        self.admission.check_open()

    async def entry(self, name: str | None, principal: Principal) -> CatalogEntry:
        """The catalog entry a request runs on (its name, else the caller's default, else the
        cluster's); 403 before 404 so a tenant cannot probe names outside its list."""
        if name in (None, "", self.model_name, "default"):
            name = principal.default_adapter
            if name is None:  # the cluster's default: resolved and fetched in one catalog call
                entry: CatalogEntry | None = await self.catalog.get.remote(None)
                if entry is None:
                    raise ServiceUnavailable("no adapter is loaded; load one with POST /v1/adapters", code="no_adapter")
                principal.check_adapter(entry.name)
                return entry
        principal.check_adapter(name)
        entry = await self.catalog.get.remote(name)
        if entry is None:
            raise NotFound(f"adapter '{name}' is not loaded; GET /v1/models lists the adapters you can use",
                           code="adapter_not_found", param="model")
        return entry

    async def run(self, job: ChatJob, ctx: RequestContext) -> AsyncGenerator[ChatChunk, None]:
        """Admit here, then stream the replica's chunks; closing this generator (client gone)
        cancels the replica's stream, which aborts its engine request."""
        from ray.exceptions import RayError

        self.admission.check_open()
        ctx.deadline = ctx.deadline.tighten(job.timeout_s)
        ctx.slot = await self.admission.acquire(ctx.tenant, timeout=ctx.deadline.remaining())
        try:
            entry = await self.entry(job.adapter, ctx.principal)
            ctx.adapter = entry.name
            handle = self.model.options(stream=True, **(
                {"multiplexed_model_id": entry.name} if self.settings.replica_affinity else {}))
            stream = handle.generate.remote(replace(job, adapter=entry.name), WireContext.of(ctx, entry.version))
            done = False
            try:
                async for item in stream:
                    if isinstance(item, ReplicaHello):
                        holder = _answered_by.get()
                        if holder is not None:
                            holder.append(item.replica)
                    elif isinstance(item, WireError):
                        raise item.error()
                    else:
                        yield item
                done = True
            except RayError as e:
                log.warning("model replica failed mid-request", extra={"error": str(e)[:500]})
                raise replica_failed(e) from None
            finally:
                if not done:
                    stream.cancel()
        finally:
            ctx.slot.release()


@dataclass
class IngressState:
    """What the shared routes read from ``app.state.aura`` on the ingress."""

    settings: Settings
    service: RemoteChatService
    tenancy: Tenancy
    model_name: str
    model_path: Path
    started_at: float = field(default_factory=time.time)

    @property
    def draining(self) -> bool:
        return self.service.admission.draining


def _state(request: Request) -> IngressState:
    return request.app.state.aura


router = APIRouter()


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    state = _state(request)
    if state.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    listing: ClusterAdapterList = await state.service.catalog.listing.remote()
    wanted = state.settings.replicas or 1
    if len(listing.replicas) < wanted:  # model replicas report to the catalog once their engine runs
        return JSONResponse({"status": "starting", "replicas": len(listing.replicas), "wanted": wanted},
                            status_code=503)
    default = await state.service.catalog.get_default.remote()
    if default is None:
        return JSONResponse({"status": "no_adapter"}, status_code=503)
    return JSONResponse({"status": "ready", "default_adapter": default, "replicas": len(listing.replicas)})


@router.get("/v1/models", response_model=ModelList, responses=error_responses(401))
async def list_models(request: Request, who: Principal = Depends(authenticate)) -> ModelList:
    state = _state(request)
    listing: ClusterAdapterList = await state.service.catalog.listing.remote()
    default = who.default_adapter or next((a.name for a in listing.data if a.default), None)
    cards = [ModelCard(id=state.model_name, created=int(state.started_at), kind="base", root=str(state.model_path))]
    cards += [ModelCard(id=a.name, created=a.published_at, kind="adapter", root=a.source, parent=state.model_name,
                        version=a.version, default=a.name == default)
              for a in listing.data if who.may_use(a.name)]
    return ModelList(data=cards)


@router.get("/v1/adapters", response_model=ClusterAdapterList, responses=error_responses(401))
async def list_adapters(request: Request, who: Principal = Depends(authenticate)) -> ClusterAdapterList:
    """Catalog versions, and which replica holds which version (replica details: admins only)."""
    listing: ClusterAdapterList = await _state(request).service.catalog.listing.remote()
    listing.data = [a for a in listing.data if who.may_use(a.name)]
    if not who.is_admin:
        listing.replicas = []
    return listing


@router.post("/v1/adapters", response_model=AdapterInfo,
             responses=error_responses(400, 401, 403, 404, 409, 413, 422, 502, 503, 504))
async def load_adapter(body: AdapterLoadRequest, request: Request, who: Principal = Depends(authenticate)) -> AdapterInfo:
    """Load or replace: one replica fetches, validates and loads it, then the catalog numbers the
    new version; the other replicas load it before their next request for it."""
    from ray.exceptions import RayError

    state = _state(request)
    who.check_manage(body.name)
    if body.name in (state.model_name, "default"):
        raise BadRequest(f"'{body.name}' is reserved (it means the default adapter); choose another name",
                         code="reserved_name", param="name")
    handle = state.service.model.options(multiplexed_model_id=body.name)
    try:
        out = await handle.publish.remote(body.name, body.source, body.sha256, who.is_admin)
    except RayError as e:
        raise replica_failed(e) from None
    holder = _answered_by.get()
    if holder is not None:
        holder.append(out["replica"])
    if "error" in out:
        raise out["error"].error()
    return AdapterInfo.model_validate(out["info"])


@router.delete("/v1/adapters/{name}", response_model=AdapterDeleted, responses=error_responses(401, 403, 404))
async def unload_adapter(name: str, request: Request, who: Principal = Depends(authenticate)) -> AdapterDeleted:
    """Unload from the catalog: new requests get 404 at once; replicas free it on LRU eviction."""
    state = _state(request)
    who.check_adapter(name)
    who.check_manage(name)
    entry: CatalogEntry | None = await state.service.catalog.remove.remote(name)
    if entry is None:
        raise NotFound(f"adapter '{name}' is not loaded", code="adapter_not_found")
    return AdapterDeleted(name=name, version=entry.version)


def build_ingress_app(state: IngressState) -> FastAPI:
    app = FastAPI(title="AuRA serve (Ray Serve)", version="0.1.0")
    app.state.aura = state
    app.include_router(chat.router)
    app.include_router(transcriptions.router)
    app.include_router(router)
    app.include_router(metrics_route.router)
    metrics = ServerMetrics(state.settings.metrics_max_label_values)
    admission = state.service.admission
    metrics.bind(in_flight=lambda: admission.running, queued=lambda: admission.waiting, engine_requests=lambda: 0)
    app.state.metrics = metrics
    app.add_middleware(ReplicaHeaderMiddleware)
    app.add_middleware(ObservabilityMiddleware)
    add_error_handlers(app)
    return app


class Ingress:
    """The ingress deployment's class (``serve.ingress`` + ``serve.deployment`` by the launcher)."""

    def __init__(self, settings: Settings, model: object, catalog_name: str, namespace: str, model_name: str,
                 model_path: str) -> None:
        import ray

        from server.logs import setup_logging

        setup_logging(settings.log_level, settings.log_format)
        catalog = ray.get_actor(catalog_name, namespace=namespace)
        tenancy = Tenancy(load_config(settings.config_file) if settings.config_file else None)
        self.state = IngressState(settings, RemoteChatService(settings, model, catalog, model_name), tenancy,
                                  model_name, Path(model_path))

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_ingress_app(self.state)

    async def drain(self, timeout_s: float) -> int:
        """Stop admitting (503 + /ready 503) and wait up to ``timeout_s`` for running requests."""
        admission = self.state.service.admission
        admission.draining = True
        deadline = time.monotonic() + timeout_s
        while admission.busy and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return admission.busy
