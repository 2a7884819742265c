"""GET /health (the process and engine are alive) and GET /ready (able to serve requests)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from server.engine.base import EngineDead

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    state = getattr(request.app.state, "aura", None)
    if state is None:
        return JSONResponse({"status": "starting"}, status_code=503)
    try:
        await state.engine.check_health()
    except EngineDead as e:
        return JSONResponse({"status": "engine_dead", "detail": str(e)}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    state = getattr(request.app.state, "aura", None)
    if state is None:
        return JSONResponse({"status": "starting"}, status_code=503)
    if state.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    try:
        await state.engine.check_health()
    except EngineDead as e:
        return JSONResponse({"status": "engine_dead", "detail": str(e)}, status_code=503)
    if state.registry.default is None:
        return JSONResponse({"status": "no_adapter"}, status_code=503)
    return JSONResponse({"status": "ready", "default_adapter": state.registry.default,
                         "adapters": len(state.registry.names())})
