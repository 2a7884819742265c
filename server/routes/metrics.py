"""GET /metrics: the server's own families and vLLM's ``vllm:*`` families, in Prometheus text.

Who may scrape: the metrics name every loaded adapter and every tenant, so an open ``/metrics``
would undo "a 403 does not reveal whether an adapter exists". Default, and why:

* with ``--config`` (API keys exist): an admin key, or the ``metrics_key`` if one is set
  (``Authorization: Bearer <key>``; a Prometheus scrape job sends it with ``authorization:``);
* open mode (no config: every caller is already an admin): open, unless a ``metrics_key`` is set;
* with a ``metrics_port``: ``/metrics`` is served on that listener only (nothing else is), which
  an operator keeps off the network clients reach; there it is open unless a ``metrics_key`` is set.
"""

from __future__ import annotations

import hashlib
import hmac

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocketClose

from server.errors import Forbidden, NotFound, Unauthorized
from server.tenancy import hash_key

router = APIRouter()


def _key_digest(configured: str) -> bytes:
    """A configured key as a sha256 digest (it may be stored as 'sha256:<hex>' or plain)."""
    stored = configured if configured.startswith("sha256:") else hash_key(configured)
    return bytes.fromhex(stored.split(":", 1)[1])


def check_metrics_access(request: Request) -> None:
    state = request.app.state.aura
    metrics_key: str | None = state.settings.metrics_key
    header = request.headers.get("authorization")
    if metrics_key and header:
        scheme, _, key = header.strip().partition(" ")
        if scheme.lower() == "bearer" and key.strip():
            given = hashlib.sha256(key.strip().encode()).digest()
            if hmac.compare_digest(given, _key_digest(metrics_key)):
                return
    tenancy = state.tenancy
    if tenancy is None or tenancy.open or state.settings.metrics_port is not None:
        if not metrics_key:
            return
        raise Unauthorized("GET /metrics needs the metrics key: 'Authorization: Bearer <metrics key>'",
                           code="metrics_key_required", headers={"WWW-Authenticate": "Bearer"})
    who = tenancy.authenticate(header)  # 401 for a missing or unknown key
    if not who.is_admin:
        raise Forbidden("GET /metrics needs an admin key or the metrics key", code="metrics_forbidden")


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    check_metrics_access(request)
    metrics = request.app.state.metrics
    await metrics.refresh_engine(getattr(request.app.state.aura, "engine", None))  # Ray ingress: no engine here
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)


class MetricsListener:
    """With a ``metrics_port``, the server listens twice; this keeps each listener to its routes:
    the metrics listener answers ``/metrics`` only, the API listener everything but ``/metrics``.
    Anything else is a 404, as for a route that does not exist. Pure ASGI, outermost."""

    def __init__(self, app: ASGIApp, metrics_port: int) -> None:
        self.app = app
        self.metrics_port = metrics_port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            server = scope.get("server")
            on_metrics_listener = server is not None and server[1] == self.metrics_port
            if on_metrics_listener != (scope["path"] == "/metrics"):
                if scope["type"] == "websocket":
                    await WebSocketClose(code=1008)(scope, receive, send)
                    return
                where = "the metrics port" if on_metrics_listener else "this port (it is on the metrics port)"
                err = NotFound(f"{scope['path']} is not served on {where}")
                await JSONResponse(err.to_dict(), status_code=404)(scope, receive, send)
                return
        await self.app(scope, receive, send)
