"""The request context: who asked, by when it must be done, and where it stands in the pipeline.

It travels with the job into :meth:`server.serving.ChatService.run` instead of riding on
``request.state`` or on fields stamped onto the job, so every entry point (HTTP route, benchmark,
``aura eval``, tests, later a realtime socket or a Ray replica) hands the pipeline the same thing.
The service fills in what it learns (the slot it was admitted with, the adapter it resolved and
authorised), and observers read it back from here: the metric labels are therefore known only
after authorisation.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from server.admission import Deadline, Slot
from server.tenancy import OPEN_PRINCIPAL, Principal


@dataclass
class RequestContext:
    principal: Principal
    tenant: str
    deadline: Deadline
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # perf_counter when the request arrived (before its body was read and before admission), so
    # TTFT and e2e include the upload and the queue.
    arrived_at: float = field(default_factory=time.perf_counter)
    # Filled in by ChatService.run: the pipeline slot once admitted, the adapter once resolved
    # *and* authorised (None until then, so a refused name never becomes a metric label).
    slot: Slot | None = None
    adapter: str | None = None

    @classmethod
    def local(cls, timeout_s: float, *, tenant: str = "local", principal: Principal = OPEN_PRINCIPAL,
              request_id: str | None = None) -> "RequestContext":
        """A context for in-process callers (benchmarks, ``aura eval``, tests): full rights."""
        ctx = cls(principal=principal, tenant=tenant, deadline=Deadline.after(timeout_s))
        if request_id:
            ctx.request_id = request_id
        return ctx

    @property
    def admission_wait_s(self) -> float | None:
        return self.slot.waited_s if self.slot is not None else None
