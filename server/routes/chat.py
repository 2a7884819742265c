"""POST /v1/audio/chat (multipart or JSON) and POST /v1/chat/completions (JSON)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.types import Receive, Scope, Send

from server.errors import BadRequest, PayloadTooLarge, UnsupportedMedia, Unprocessable
from server.limits import Deadline, Slot, admit, max_body_bytes, read_body
from server.logs import request_id_var
from server.protocol import ChatCompletion, ChatCompletionRequest
from server.serving import AudioInput, ChatJob, job_from_openai
from server.state import ServerState

router = APIRouter()

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class AudioChatForm(BaseModel):
    """The multipart form of /v1/audio/chat (``file`` is the audio upload)."""

    prompt: str | None = None
    adapter: str | None = None
    model: str | None = None
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    return_token_ids: bool = False
    timeout: float | None = Field(None, gt=0, description="Seconds this request may take (capped by the server).")


class _ReleasingStream(StreamingResponse):
    """An SSE response that frees the request's pipeline slot and adapter lease when it ends,
    however it ends (finished, client gone, error), and closes the token stream first so an
    unfinished engine request is aborted right away rather than whenever GC gets to it."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._content = content
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self._content.aclose()  # type: ignore[attr-defined]
            finally:
                self._on_close()


def validation_error(e: ValidationError, where: str) -> Unprocessable:
    first = e.errors()[0]
    loc = ".".join(str(x) for x in first["loc"]) or where
    return Unprocessable(f"{where} field '{loc}': {first['msg']}", param=loc)


def _state(request: Request) -> ServerState:
    return request.app.state.aura


async def _job_from_form(request: Request, state: ServerState) -> ChatJob:
    max_part = state.settings.max_upload_bytes + 1
    try:
        form = await request.form(max_part_size=max_part)
    except Exception as e:  # starlette raises MultiPartException with a useful message
        raise BadRequest(f"malformed multipart body: {e}", code="bad_multipart") from e
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise Unprocessable("multipart field 'file' (the audio upload) is required", param="file")
    data = await upload.read(state.settings.max_upload_bytes + 1)
    if len(data) > state.settings.max_upload_bytes:
        raise PayloadTooLarge(f"the upload is larger than {state.settings.max_upload_bytes} bytes; send a smaller file",
                              code="audio_too_large", param="file")
    fields: dict[str, Any] = {k: v for k, v in form.multi_items() if isinstance(v, str) and k != "stop"}
    stops = [v for v in form.getlist("stop") if isinstance(v, str) and v]
    try:
        f = AudioChatForm(**fields, stop=stops)
    except ValidationError as e:
        raise validation_error(e, "form") from None
    parts: list[str | AudioInput] = [AudioInput(data, upload.content_type)]
    if f.prompt:
        parts.append(f.prompt)
    return ChatJob(adapter=f.adapter or f.model, turns=[("user", parts)], max_tokens=f.max_tokens,
                   temperature=f.temperature, top_p=f.top_p, seed=f.seed, stop=tuple(stops), stream=f.stream,
                   return_token_ids=f.return_token_ids, timeout_s=f.timeout)


async def _job_from_json(request: Request) -> ChatJob:
    raw = await read_body(request, max_body_bytes(_state(request).settings))
    try:
        body = json.loads(raw)
    except ValueError as e:
        raise Unprocessable(f"the body is not valid JSON: {e}", code="invalid_json") from None
    try:
        req = ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        raise validation_error(e, "body") from None
    return job_from_openai(req)


async def _respond(request: Request, job: ChatJob, slot: Slot | None = None, deadline: Deadline | None = None,
                   arrived: float | None = None):
    """Run an admitted job; the slot is released here, or by the SSE response when it ends."""
    state = _state(request)
    rid = request_id_var.get()
    if rid:
        job.request_id = rid
    job.tenant = getattr(request.state, "aura_tenant", None) or job.tenant
    job.deadline = deadline.tighten(job.timeout_s) if deadline is not None else None
    job.arrived_at = arrived
    job.admission_wait_s = slot.waited_s if slot is not None else None
    auth = getattr(request.state, "principal", None)
    name = state.service.resolve_adapter(job.adapter, getattr(auth, "default_adapter", None))
    request.state.aura_adapter = name
    if auth is not None:
        auth.check_adapter(name)
    lease = state.registry.lease(name)

    def release() -> None:
        lease.release()
        if slot is not None:
            slot.release()

    if not job.stream:
        try:
            prepared = await state.service.prepare(job, lease.version)
            result: ChatCompletion = await state.service.complete(prepared)
        finally:
            release()
        return JSONResponse(result.model_dump())
    try:
        prepared = await state.service.prepare(job, lease.version)
    except BaseException:
        release()
        raise
    return _ReleasingStream(state.service.stream(prepared), release, media_type="text/event-stream",
                            headers=_SSE_HEADERS)


async def _admitted(request: Request, parse: Callable[[], Any]):
    """Admission first (before the body is read), then parse and run; a failure frees the slot."""
    arrived = time.perf_counter()
    slot, deadline = await admit(request, _state(request))
    try:
        job = await parse()
        return await _respond(request, job, slot, deadline, arrived)
    except BaseException:
        if slot is not None:
            slot.release()  # idempotent: a streaming response that took it over releases it too
        raise


@router.post("/v1/audio/chat", response_model=ChatCompletion)
async def audio_chat(request: Request):
    """A spoken question in, the answer out (streamed as SSE with ``stream=true``)."""
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        return await _admitted(request, lambda: _job_from_form(request, _state(request)))
    if ctype.startswith("application/json") or not ctype:
        return await _admitted(request, lambda: _job_from_json(request))
    raise UnsupportedMedia(f"Content-Type '{ctype}' is not accepted; send multipart/form-data or application/json",
                           code="unsupported_content_type")


@router.post("/v1/chat/completions", response_model=ChatCompletion)
async def chat_completions(request: Request):
    """The same handler in OpenAI's JSON shape, so stock OpenAI clients work unchanged."""
    return await _admitted(request, lambda: _job_from_json(request))
