"""Admission control: a bounded pipeline, a bounded fair wait queue, per-tenant caps, deadlines.

Why here and not in vLLM: a request costs memory (its upload, decoded samples, audio vectors)
and front-end time long before vLLM sees it, so the server bounds what it accepts at the door —
before the body is read. At most ``max_concurrent`` requests are in the pipeline (decode → last
token); up to ``max_queued`` more wait; anything beyond is refused at once with 429 and
``Retry-After``, so memory stays bounded however hard clients push.

Fairness: a tenant may hold at most ``tenant_max_concurrent`` pipeline slots and
``tenant_max_queued`` places in the queue, and free slots go round-robin to the tenants that
are waiting, so a tenant flooding the server only queues behind itself.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from server.config import Settings
from server.engine.base import EngineDead
from server.errors import APIError, PayloadTooLarge, ServiceUnavailable, TooManyRequests

if TYPE_CHECKING:
    from server.state import ServerState


class DeadlineExceeded(APIError):
    """The request ran past its deadline; whatever it had in the engine was aborted."""

    status_code = 504
    type = "timeout_error"
    code = "deadline_exceeded"


@dataclass(frozen=True)
class Deadline:
    """An absolute point on the monotonic clock by which a request must be done."""

    at: float
    timeout_s: float

    @classmethod
    def after(cls, timeout_s: float) -> "Deadline":
        return cls(time.monotonic() + timeout_s, timeout_s)

    def tighten(self, timeout_s: float | None) -> "Deadline":
        """The request's own ``timeout`` (seconds from arrival), never beyond the server's limit."""
        if timeout_s is None or timeout_s >= self.timeout_s:
            return self
        return Deadline(self.at - self.timeout_s + timeout_s, timeout_s)

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def check(self, stage: str) -> float:
        """Seconds left; raises :class:`DeadlineExceeded` naming ``stage`` when none are."""
        left = self.remaining()
        if left <= 0:
            raise self.error(stage)
        return left

    def error(self, stage: str) -> DeadlineExceeded:
        return DeadlineExceeded(
            f"the request did not finish within its deadline of {self.timeout_s:g} s (it was {stage}); "
            "ask for fewer tokens, send shorter audio, or set a longer 'timeout'", param="timeout")


@dataclass
class _Waiter:
    tenant: str
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class Slot:
    """One request's place in the pipeline; ``release()`` is idempotent."""

    def __init__(self, controller: "AdmissionController", tenant: str, waited_s: float) -> None:
        self._controller = controller
        self.tenant = tenant
        self.waited_s = waited_s
        self._held = True

    @property
    def held(self) -> bool:
        return self._held

    def release(self) -> None:
        if self._held:
            self._held = False
            self._controller._release(self.tenant)


class AdmissionController:
    """Bounded concurrency + bounded fair queue. Event-loop-only (no locks needed)."""

    def __init__(self, *, max_concurrent: int, max_queued: int, tenant_max_concurrent: int,
                 tenant_max_queued: int, queue_timeout_s: float, retry_after_s: float = 1.0) -> None:
        self.max_concurrent = max_concurrent
        self.max_queued = max_queued
        self.tenant_max_concurrent = tenant_max_concurrent
        self.tenant_max_queued = tenant_max_queued
        self.queue_timeout_s = queue_timeout_s
        self.retry_after_s = retry_after_s
        self.running = 0
        self.waiting = 0
        self._running_by_tenant: dict[str, int] = {}
        # tenant -> its waiters, in round-robin order (a served tenant moves to the back).
        self._queues: OrderedDict[str, deque[_Waiter]] = OrderedDict()

    @classmethod
    def from_settings(cls, s: Settings) -> "AdmissionController":
        return cls(max_concurrent=s.max_concurrent_requests, max_queued=s.max_queued_requests,
                   tenant_max_concurrent=s.resolved_tenant_max_concurrent(),
                   tenant_max_queued=max(1, s.max_queued_requests // 2), queue_timeout_s=s.queue_timeout_s)

    def running_for(self, tenant: str) -> int:
        return self._running_by_tenant.get(tenant, 0)

    def _reject(self, message: str, code: str) -> TooManyRequests:
        return TooManyRequests(message, code=code, headers={"Retry-After": str(math.ceil(self.retry_after_s))})

    async def acquire(self, tenant: str, *, timeout: float | None = None) -> Slot:
        """A pipeline slot for ``tenant``, waiting at most ``timeout`` (default: queue_timeout_s)."""
        waiter = _Waiter(tenant, asyncio.get_running_loop().create_future())
        self._queues.setdefault(tenant, deque()).append(waiter)
        self.waiting += 1
        self._dispatch()
        if waiter.future.done():
            return waiter.future.result()
        # Not admitted at once: may it wait?
        if len(self._queues.get(tenant, ())) > self.tenant_max_queued:
            self._forget(waiter)
            raise self._reject(
                f"tenant '{tenant}' already has {self.running_for(tenant)} requests running and "
                f"{self.tenant_max_queued} waiting, its share of this server; retry later",
                "tenant_concurrency_limit")
        if self.waiting > self.max_queued:
            self._forget(waiter)
            raise self._reject(
                f"the server is at capacity ({self.running} requests running, {self.max_queued} waiting); "
                "retry later", "server_busy")
        wait_s = self.queue_timeout_s if timeout is None else min(timeout, self.queue_timeout_s)
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), timeout=max(0.0, wait_s))
        except (asyncio.TimeoutError, asyncio.CancelledError) as e:
            if waiter.future.done() and not waiter.future.cancelled():
                slot: Slot = waiter.future.result()
                if isinstance(e, asyncio.TimeoutError):
                    return slot  # admitted in the same instant it timed out
                slot.release()
                raise
            waiter.future.cancel()
            self._forget(waiter)
            if isinstance(e, asyncio.CancelledError):
                raise
            raise self._reject(
                f"no pipeline slot freed up within {wait_s:g} s ({self.running} requests running); retry later",
                "queue_timeout") from None
        return waiter.future.result()

    def _forget(self, waiter: _Waiter) -> None:
        q = self._queues.get(waiter.tenant)
        if q is not None and waiter in q:
            q.remove(waiter)
            self.waiting -= 1
            if not q:
                del self._queues[waiter.tenant]

    def _release(self, tenant: str) -> None:
        self.running -= 1
        left = self._running_by_tenant.get(tenant, 1) - 1
        if left:
            self._running_by_tenant[tenant] = left
        else:
            self._running_by_tenant.pop(tenant, None)
        self._dispatch()

    def _dispatch(self) -> None:
        """Hand free slots to waiting tenants round-robin, skipping tenants at their cap."""
        while self.running < self.max_concurrent and self._queues:
            for tenant in list(self._queues):
                if self.running_for(tenant) < self.tenant_max_concurrent:
                    break
            else:
                return  # everyone waiting is at their own cap
            q = self._queues.pop(tenant)
            waiter = q.popleft()
            self.waiting -= 1
            if q:
                self._queues[tenant] = q  # back of the rotation
            if waiter.future.done():  # its caller gave up
                continue
            self.running += 1
            self._running_by_tenant[tenant] = self.running_for(tenant) + 1
            waiter.future.set_result(Slot(self, tenant, time.perf_counter() - waiter.enqueued))


# ---- the door: what every chat request passes before its body is read ----------------------

_TENANT_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:@")


def tenant_of(request: Any, settings: Settings) -> str:
    """The tenant a request counts against: the API key's tenant (``request.state.principal``,
    set by tenancy), else the configured trusted header (tests, trusted proxies), else 'default'."""
    principal = getattr(request.state, "principal", None)
    tenant = getattr(principal, "tenant", None)
    if settings.tenant_header and (tenant is None or tenant == _open_tenant()):
        value = request.headers.get(settings.tenant_header, "")[:64]
        if value and set(value) <= _TENANT_OK:
            return value
    return str(tenant) if tenant else "default"


def _open_tenant() -> str | None:
    """The tenant of keyless (open) servers, whose requests the trusted header may re-key."""
    try:
        from server.tenancy import OPEN_TENANT
    except ImportError:
        return None
    return OPEN_TENANT


def max_body_bytes(settings: Settings) -> int:
    """The largest request body worth reading: the upload limit as base64 (4/3) plus 1 MiB of
    form fields / JSON around it. Anything larger is refused from its Content-Length alone."""
    return settings.max_upload_bytes * 4 // 3 + (1 << 20)


async def admit(request: Any, state: "ServerState") -> tuple[Slot | None, Deadline]:
    """Refuse what cannot be served (draining, dead engine, oversized body) and wait for a slot.

    Runs before the body is read, so a refused or queued request holds no upload in memory.
    """
    try:
        return await _admit(request, state)
    except APIError:
        await discard_body(request)
        raise


async def discard_body(request: Any, limit: int = 4 << 20, timeout_s: float = 2.0) -> None:
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


async def _admit(request: Any, state: "ServerState") -> tuple[Slot | None, Deadline]:
    settings = state.settings
    deadline = Deadline.after(settings.request_timeout_s)
    if state.draining:
        raise ServiceUnavailable("the server is shutting down and accepts no new requests; retry on another "
                                 "replica", code="draining", headers={"Retry-After": "1", "Connection": "close"})
    try:
        await state.engine.check_health()
    except EngineDead as e:
        raise ServiceUnavailable(f"the inference engine is not available: {e}", code="engine_unavailable") from e
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_body_bytes(settings):
        raise PayloadTooLarge(f"the request body is {int(length)} bytes; uploads are limited to "
                              f"{settings.max_upload_bytes} bytes of audio", code="request_too_large")
    tenant = tenant_of(request, settings)
    request.state.aura_tenant = tenant
    if state.limiter is None:
        return None, deadline
    slot = await state.limiter.acquire(tenant, timeout=deadline.remaining())
    return slot, deadline


async def read_body(request: Any, limit: int) -> bytes:
    """The request body, refusing (413) once it passes ``limit`` bytes, whatever the headers said."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the request body is larger than {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)
