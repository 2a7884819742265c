"""One error type for everything the server answers with a 4xx/5xx.

Every failure a client can cause or see is raised as an :class:`APIError` (or a subclass) and
rendered by one exception handler as ``{"error": {"message", "type", "code"}}`` — the OpenAI
error shape, so stock clients surface the message.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError


class APIError(Exception):
    status_code: int = 500
    type: str = "server_error"
    code: str = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        type: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        param: str | None = None,
    ) -> None:
        # Never echo what cannot be encoded (a lone surrogate from a caller's JSON would make the
        # error response itself fail with a 500).
        message = _printable(message)
        super().__init__(message)
        self.message = message
        if status_code is not None:
            self.status_code = status_code
        if type is not None:
            self.type = type
        if code is not None:
            self.code = code
        self.headers = headers or {}
        self.param = None if param is None else _printable(param)

    def to_dict(self) -> dict:
        err = {"message": self.message, "type": self.type, "code": self.code}
        if self.param is not None:
            err["param"] = self.param
        return {"error": err}


def _printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def first_error_text(errors: Sequence[Mapping[str, Any]], where: str = "") -> tuple[str, str]:
    """(location, message) of pydantic's first error: the one formatting every 422 and config error uses."""
    if not errors:
        return where, "invalid value"
    first = errors[0]
    loc = ".".join(str(x) for x in first.get("loc", ())) or where
    return _printable(loc), _printable(str(first.get("msg", "invalid value")))


class BadRequest(APIError):
    status_code = 400
    type = "invalid_request_error"
    code = "bad_request"


class Unauthorized(APIError):
    status_code = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(APIError):
    status_code = 403
    type = "permission_error"
    code = "forbidden"


class NotFound(APIError):
    status_code = 404
    type = "invalid_request_error"
    code = "not_found"


class RequestTimeout(APIError):
    status_code = 408
    type = "invalid_request_error"
    code = "request_timeout"


class PayloadTooLarge(APIError):
    status_code = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class UnsupportedMedia(APIError):
    status_code = 415
    type = "invalid_request_error"
    code = "unsupported_media"


class Unprocessable(APIError):
    status_code = 422
    type = "invalid_request_error"
    code = "validation_error"


class TooManyRequests(APIError):
    status_code = 429
    type = "rate_limit_error"
    code = "too_many_requests"


class ServiceUnavailable(APIError):
    status_code = 503
    type = "server_error"
    code = "service_unavailable"


class Conflict(APIError):
    status_code = 409
    type = "invalid_request_error"
    code = "conflict"


class BadGateway(APIError):
    status_code = 502
    type = "server_error"
    code = "upstream_failed"


class GatewayTimeout(APIError):
    status_code = 504
    type = "server_error"
    code = "upstream_timeout"


# How a lower layer's failure kind (adapters.audio.AudioError, server.sources.SourceError) becomes
# an HTTP status, decided in one place so one kind never answers two statuses. Unknown kinds: 400.
_KIND_ERRORS: dict[str, type[APIError]] = {
    "too_large": PayloadTooLarge,
    "too_long": PayloadTooLarge,
    "unsupported": UnsupportedMedia,
    "corrupt": BadRequest,
    "empty": BadRequest,
    "bad_params": BadRequest,
    "bad_source": BadRequest,
    "forbidden": Forbidden,
    "not_found": Unprocessable,
    "unsafe_source": Unprocessable,
    "unsafe_archive": Unprocessable,
    "checksum_mismatch": Unprocessable,
    "timeout": GatewayTimeout,
    "fetch_failed": BadGateway,
}


def error_for_kind(kind: str, message: str, *, family: str, param: str) -> APIError:
    """The error answering a lower layer's failure ``kind``; its code is ``{family}_{kind}``
    (``audio_too_long``, ``source_timeout``) and ``param`` names the request field at fault."""
    cls = _KIND_ERRORS.get(kind, BadRequest)
    return cls(message, code=f"{family}_{kind}", param=param)


def first_error(e: ValidationError, where: str) -> Unprocessable:
    """422 naming the first invalid field of a request ``where`` ('body', 'form', ...)."""
    loc, msg = first_error_text(e.errors(), where)
    return Unprocessable(f"{where} field '{loc}': {msg}", param=loc)
