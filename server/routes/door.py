"""The HTTP door of the chat routes: context, cheap refusals, and a bounded, timed body read.

What a chat request passes before the pipeline (``ChatService.run``) sees it:

1. its :class:`RequestContext` (request id, principal, tenant, deadline, arrival time);
2. cheap refusals that need no body — draining, a dead engine, a ``Content-Length`` over the
   limit — answered at once (a small refused body is drained so the client reads the answer);
3. the body, read *before* a pipeline slot is taken, with a place among ``max_uploads`` bodies
   in progress, a byte limit enforced while it streams in (whatever the headers claim: chunked
   uploads and oversized multipart parts included) and its own short deadline
   (``body_read_timeout_s``), so a slow upload holds neither a slot nor unbounded memory.

Nothing here writes to ``request.state``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from fastapi import Request

from server.admission import Deadline
from server.config import Settings
from server.context import RequestContext
from server.errors import APIError, PayloadTooLarge, RequestTimeout
from server.logs import request_id_var
from server.serving import ChatService
from server.tenancy import OPEN_TENANT, Principal

_TENANT_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:@")


def tenant_of(principal: Principal | None, headers: Mapping[str, str], settings: Settings) -> str:
    """The tenant a request counts against: the API key's tenant, else the configured trusted
    header (tests, trusted proxies; only on open servers), else 'default'."""
    tenant = principal.tenant if principal is not None else None
    if settings.tenant_header and (tenant is None or tenant == OPEN_TENANT):
        value = headers.get(settings.tenant_header, "")[:64]
        if value and set(value) <= _TENANT_OK:
            return value
    return tenant or "default"


def request_context(request: Request, principal: Principal, settings: Settings) -> RequestContext:
    ctx = RequestContext(principal=principal, tenant=tenant_of(principal, request.headers, settings),
                         deadline=Deadline.after(settings.request_timeout_s))
    rid = request_id_var.get()
    if rid:
        ctx.request_id = rid
    return ctx


async def receive(request: Request, service: ChatService, ctx: RequestContext) -> bytes:
    """The door in one call: cheap refusals first, then the bounded, timed body."""
    await precheck(request, service)
    return await read_body(request, service, ctx)


async def precheck(request: Request, service: ChatService) -> None:
    """Refuse what cannot be served before reading the body (draining, dead engine, too large)."""
    try:
        await service.check_accepting()
        limit = service.settings.max_body_bytes()
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise PayloadTooLarge(f"the request body is {int(length)} bytes; uploads are limited to "
                                  f"{service.settings.max_upload_bytes} bytes of audio", code="request_too_large")
    except APIError:
        await discard_body(request)
        raise


async def discard_body(request: Request, limit: int = 4 << 20, timeout_s: float = 2.0) -> None:
    """Read and drop a small refused body, so the client reads our 429/503 rather than a TCP
    reset (closing a socket with unread input resets it). Large or slow bodies are left alone."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        return
    seen = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                seen += len(chunk)
                if seen > limit:
                    return
    except Exception:  # noqa: BLE001 - best effort (timeout, client gone); the refusal stands either way
        return


async def read_body(request: Request, service: ChatService, ctx: RequestContext) -> bytes:
    """The whole body, refused with 413 once it passes the limit and 408 once the read takes
    longer than ``body_read_timeout_s`` (or what is left of the request's deadline)."""
    settings = service.settings
    limit = settings.max_body_bytes()
    upload = service.admission.start_upload()
    chunks: list[bytes] = []
    size = 0
    timeout_s = min(settings.body_read_timeout_s, max(0.0, ctx.deadline.remaining()))
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"the request body is larger than {limit} bytes; uploads are limited to "
                                          f"{settings.max_upload_bytes} bytes of audio", code="request_too_large")
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within {timeout_s:g} s ({size} bytes came); "
                             "send it faster or send less", code="body_read_timeout") from None
    finally:
        upload.release()
    return b"".join(chunks)
