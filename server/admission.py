"""Admission control: a bounded pipeline, a bounded fair wait queue, per-tenant caps, deadlines.

Why here and not in vLLM: a request costs memory (its upload, decoded samples, audio vectors)
and front-end time long before vLLM sees it, so the server bounds what it accepts. At most
``max_concurrent`` requests are in the pipeline (decode → last token); up to ``max_queued`` more
wait; anything beyond is refused at once with 429 and ``Retry-After``. Bodies are read *before* a
slot is taken (a slow upload must not hold one), so uploads in progress are bounded separately
(``max_uploads``) and each read has its own short deadline (``server/routes/door.py``).

Fairness: a tenant may hold at most ``tenant_max_concurrent`` pipeline slots (never more than
the engine's batch, see :meth:`Settings.resolved_tenant_max_concurrent`) and
``tenant_max_queued`` places in the queue, and free slots go round-robin to the tenants that
are waiting, so a tenant flooding the server only queues behind itself.

Pure asyncio: nothing here knows HTTP, the engine or the server state.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from server.config import Settings
from server.errors import APIError, ServiceUnavailable, TooManyRequests


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


class Upload:
    """One body read in progress; ``release()`` is idempotent."""

    def __init__(self, controller: "AdmissionController") -> None:
        self._controller: AdmissionController | None = controller

    def release(self) -> None:
        if self._controller is not None:
            self._controller.uploads -= 1
            self._controller = None


class AdmissionController:
    """Bounded concurrency + bounded fair queue. Event-loop-only (no locks needed)."""

    def __init__(self, *, max_concurrent: int, max_queued: int, tenant_max_concurrent: int,
                 tenant_max_queued: int, queue_timeout_s: float, retry_after_s: float = 1.0,
                 max_uploads: int | None = None) -> None:
        self.max_concurrent = max_concurrent
        self.max_uploads = max_concurrent + max_queued if max_uploads is None else max_uploads
        self.uploads = 0
        self.draining = False
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
                   tenant_max_queued=max(1, s.max_queued_requests // 2), queue_timeout_s=s.queue_timeout_s,
                   max_uploads=s.resolved_max_uploads())

    def check_open(self) -> None:
        """503 once the server drains (SIGTERM): admitted work finishes, new work goes elsewhere."""
        if self.draining:
            raise ServiceUnavailable("the server is shutting down and accepts no new requests; retry on another "
                                     "replica", code="draining", headers={"Retry-After": "1", "Connection": "close"})

    def start_upload(self) -> "Upload":
        """A place for one request body being read (bodies are read before admission)."""
        if self.uploads >= self.max_uploads:
            raise self._reject(f"the server is reading {self.uploads} request bodies already; retry later",
                               "server_busy")
        self.uploads += 1
        return Upload(self)

    @property
    def busy(self) -> int:
        """Requests admitted or waiting (what a drain waits for)."""
        return self.running + self.waiting

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
