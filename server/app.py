"""The FastAPI application factory: routers, error rendering, and the lifespan that owns the engine."""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from server.config import Settings
from server.errors import APIError, Unprocessable
from server.logs import setup_logging
from server.metrics import ObservabilityMiddleware, ServerMetrics, log_record
from server.routes import adapters, chat, health, models
from server.routes import metrics as metrics_route
from server.state import build_state
from server.tenancy import authenticate

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
        limiter = state.limiter
        metrics.bind(in_flight=lambda: limiter.running if limiter else 0,
                     queued=lambda: limiter.waiting if limiter else 0,
                     engine_requests=state.engine.num_running)
        state.service.observers.append(metrics.observe)
        if settings.log_requests:
            state.service.observers.append(log_record)
        log.info("server ready", extra={
            "model": state.model_name, "engine": state.engine.name, "adapters": state.registry.names(),
            "default_adapter": state.registry.default, "startup_s": round(time.perf_counter() - t0, 1),
        })
        try:
            yield
        finally:
            state.frontend.close()
            await state.engine.shutdown()

    app = FastAPI(title="AuRA serve", version="0.1.0", lifespan=lifespan)
    # Every /v1 route authenticates (sets request.state.principal); /health, /ready, /metrics stay open.
    v1_auth = [Depends(authenticate)]
    app.include_router(chat.router, dependencies=v1_auth)
    app.include_router(models.router, dependencies=v1_auth)
    app.include_router(adapters.router, dependencies=v1_auth)
    app.include_router(health.router)
    app.include_router(metrics_route.router)
    # Request ids on every log line + X-Request-ID + status counts (pure ASGI: see server/metrics.py).
    metrics = ServerMetrics(settings.metrics_max_label_values)
    app.state.metrics = metrics
    app.add_middleware(ObservabilityMiddleware, metrics=metrics)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        if exc.status_code >= 500:
            log.warning("request failed", extra={"status": exc.status_code, "code": exc.code, "error": exc.message})
        return JSONResponse(exc.to_dict(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = ".".join(str(x) for x in first.get("loc", ()))
        err = Unprocessable(f"field '{loc}': {first.get('msg')}", param=loc)
        return JSONResponse(err.to_dict(), status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        err = APIError("internal server error; the request id in X-Request-ID finds it in the logs")
        return JSONResponse(err.to_dict(), status_code=500)

    return app
