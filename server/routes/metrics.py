"""GET /metrics: the server's own families and vLLM's ``vllm:*`` families, in Prometheus text.

Who may scrape: the metrics name every loaded adapter and every tenant, so an open ``/metrics``
would undo "a 403 does not reveal whether an adapter exists". Default, and why:

* with ``--config`` (API keys exist): an admin key, or the ``metrics_key`` if one is set
  (``Authorization: Bearer <key>``; a Prometheus scrape job sends it with ``authorization:``);
* open mode (no config: every caller is already an admin): open, unless a ``metrics_key`` is set.
"""

from __future__ import annotations

import hashlib
import hmac

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from server.errors import Forbidden, Unauthorized
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
    if tenancy is None or tenancy.open:
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
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
