"""What crosses the Ray boundary between the ingress and a model replica (pickled by Ray).

The job itself travels as the service's own :class:`server.serving.ChatJob` and the answer as
its chunks (``Started``/``TextDelta``/``Finished``); these few types carry the rest: who asked
and by when, which replica answered, and a typed error that the ingress re-raises as the same
:class:`server.errors.APIError` (status, code, message) the replica raised.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.admission import Deadline
from server.context import RequestContext
from server.errors import APIError
from server.tenancy import Principal


@dataclass(frozen=True)
class WireContext:
    """A :class:`RequestContext` minus what is local to the ingress (its slot, its clock)."""

    principal: Principal
    tenant: str
    request_id: str
    remaining_s: float
    min_version: int  # the catalog version the ingress read: the replica must serve this or newer

    @classmethod
    def of(cls, ctx: RequestContext, min_version: int) -> "WireContext":
        return cls(ctx.principal, ctx.tenant, ctx.request_id, max(0.0, ctx.deadline.remaining()), min_version)

    def context(self) -> RequestContext:
        """The replica's own context: same caller and id, the deadline that was left on arrival."""
        return RequestContext(principal=self.principal, tenant=self.tenant, request_id=self.request_id,
                              deadline=Deadline.after(self.remaining_s))


@dataclass(frozen=True)
class ReplicaHello:
    """First item of every replica stream: who answers (the ``X-Aura-Replica`` header) and with
    which catalog version of the adapter."""

    replica: str
    version: int | None


@dataclass(frozen=True)
class WireError:
    status_code: int
    type: str
    code: str
    message: str
    param: str | None
    headers: dict[str, str]

    @classmethod
    def of(cls, e: APIError) -> "WireError":
        return cls(e.status_code, e.type, e.code, e.message, e.param, dict(e.headers))

    def error(self) -> APIError:
        return APIError(self.message, status_code=self.status_code, type=self.type, code=self.code,
                        headers=self.headers, param=self.param)
