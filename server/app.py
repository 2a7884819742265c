"""The FastAPI application factory: routers, error rendering, and the lifespan that owns the engine."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager, suppress

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from server.config import Settings
from server.engine.base import EngineDead
from server.errors import APIError, Unprocessable, first_error_text
from server.logs import setup_logging
from server.metrics import ObservabilityMiddleware, ServerMetrics, log_record
from server.routes import adapters, chat, health, models, playground, realtime, transcriptions
from server.routes import metrics as metrics_route
from server.state import ServerState, build_state

log = logging.getLogger("server")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        setup_logging(settings.log_level, settings.log_format)
        t0 = time.perf_counter()
        state = await build_state(settings)
        state.started_at = time.time()
        app.state.aura = state
        admission = state.admission
        metrics.bind(in_flight=lambda: admission.running, queued=lambda: admission.waiting,
                     engine_requests=state.engine.num_running)
        state.service.observers.append(metrics.observe)
        if settings.log_requests:
            state.service.observers.append(log_record)
        log.info("server ready", extra={
            "model": state.model_name, "engine": state.engine.name, "adapters": state.registry.names(),
            "default_adapter": state.registry.default, "startup_s": round(time.perf_counter() - t0, 1),
        })
        watchdog = asyncio.create_task(_watch_engine(state, app))
        try:
            yield
        finally:
            watchdog.cancel()
            with suppress(asyncio.CancelledError):
                await watchdog
            state.frontend.close()
            await state.engine.shutdown()

    app = FastAPI(title="AuRA serve", version="0.1.0", lifespan=lifespan)
    # Every /v1 route takes its caller from the `authenticate` dependency; /health, /ready, /metrics stay open.
    app.include_router(chat.router)
    app.include_router(transcriptions.router)
    app.include_router(realtime.router)
    app.include_router(playground.router)
    app.include_router(models.router)
    app.include_router(adapters.router)
    app.include_router(health.router)
    app.include_router(metrics_route.router)
    metrics = ServerMetrics(settings.metrics_max_label_values)
    app.state.metrics = metrics
    # Request ids on every log line + X-Request-ID (pure ASGI: see server/metrics.py).
    app.add_middleware(ObservabilityMiddleware)
    if settings.metrics_port is not None:
        app.add_middleware(metrics_route.MetricsListener, metrics_port=settings.metrics_port)
    add_error_handlers(app)
    return app


def add_error_handlers(app: FastAPI) -> None:
    """Every failure as ``{"error": {...}}`` (also used by the Ray Serve ingress, server/cluster)."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        if exc.status_code >= 500:
            log.warning("request failed", extra={"status": exc.status_code, "code": exc.code, "error": exc.message})
        return JSONResponse(exc.to_dict(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        loc, msg = first_error_text(exc.errors())
        err = Unprocessable(f"field '{loc}': {msg}", param=loc)
        return JSONResponse(err.to_dict(), status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        err = APIError("internal server error; the request id in X-Request-ID finds it in the logs")
        return JSONResponse(err.to_dict(), status_code=500)


async def _watch_engine(state: ServerState, app: FastAPI, every_s: float = 0.5) -> None:
    """When the engine dies the server cannot recover it in place (vLLM's engine core is gone):
    answer 503 for ``engine_death_exit_s`` so probes and clients see why, then stop the process
    with a non-zero status so a supervisor (Kubernetes, systemd, Ray) starts a fresh one."""
    while True:
        await asyncio.sleep(every_s)
        try:
            await state.engine.check_health()
        except EngineDead as e:
            state.fatal = f"the inference engine died: {e}"
            log.error("the inference engine died; exiting for a restart",
                      extra={"error": str(e), "exit_in_s": state.settings.engine_death_exit_s})
            await asyncio.sleep(state.settings.engine_death_exit_s)
            stop = getattr(app.state, "stop_server", None)
            if stop is not None:
                stop()
            return
