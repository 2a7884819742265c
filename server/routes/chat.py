"""POST /v1/audio/chat (multipart or JSON) and POST /v1/chat/completions (JSON).

Thin on purpose: a route parses its wire format into a :class:`ChatJob`, hands it with a
:class:`RequestContext` to ``ChatService.run`` and renders the chunks as one ``chat.completion``
or as SSE ``chat.completion.chunk`` events. Admission, adapters, audio and the engine are the
service's business; the body limits and deadline are the door's (``server/routes/door.py``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.datastructures import FormData, Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.types import Receive, Scope, Send

from adapters.bounded_json import JSONLimitError, loads
from server.config import Settings
from server.errors import APIError, BadRequest, PayloadTooLarge, UnsupportedMedia, Unprocessable, first_error
from server.protocol import (
    AssistantMessage, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Choice, ChunkChoice, Delta,
    error_responses,
)
from server.routes.door import receive, request_context
from server.serving import AudioInput, ChatChunk, ChatJob, Finished, Started, TextDelta, collect
from server.state import ServerState
from server.tenancy import Principal, authenticate

log = logging.getLogger("server")

router = APIRouter()

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_ERRORS = error_responses(400, 401, 403, 404, 408, 413, 415, 422, 429, 503, 504)

JobParser = Callable[[bytes, Headers, Settings], Awaitable[ChatJob]]


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


# ---- wire -> job ---------------------------------------------------------------------------------

async def parse_form(body: bytes, headers: Headers, settings: Settings) -> FormData:
    """Multipart from an already bounded body: at most one file, ``max_form_fields`` fields of at
    most ``max_form_field_bytes`` each."""

    async def stream() -> AsyncIterator[bytes]:
        yield body

    parser = MultiPartParser(headers, stream(), max_files=1, max_fields=settings.max_form_fields,
                             max_part_size=settings.max_form_field_bytes)
    try:
        return await parser.parse()
    except MultiPartException as e:  # starlette says what is wrong (too many fields, part too large...)
        raise BadRequest(f"malformed multipart body: {e.message}", code="bad_multipart") from None


async def read_upload(form: FormData, settings: Settings, what: str = "the audio upload") -> AudioInput:
    """The form's ``file`` part as an :class:`AudioInput`, within the upload limit (422 / 413)."""
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise Unprocessable(f"multipart field 'file' ({what}) is required", param="file")
    data = await upload.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise PayloadTooLarge(f"the upload is larger than {settings.max_upload_bytes} bytes; send a smaller "
                              "file", code="audio_too_large", param="file")
    return AudioInput(data, upload.content_type)


async def job_from_form(body: bytes, headers: Headers, settings: Settings) -> ChatJob:
    form = await parse_form(body, headers, settings)
    try:
        audio = await read_upload(form, settings)
        fields = {k: v for k, v in form.multi_items() if isinstance(v, str) and k != "stop"}
        stops = [v for v in form.getlist("stop") if isinstance(v, str) and v]
        try:
            f = AudioChatForm(**fields, stop=stops)
        except ValidationError as e:
            raise first_error(e, "form") from None
    finally:
        await form.close()
    parts: list[str | AudioInput] = [audio]
    if f.prompt:
        parts.append(f.prompt)
    return ChatJob(adapter=f.adapter or f.model, turns=[("user", parts)], max_tokens=f.max_tokens,
                   temperature=f.temperature, top_p=f.top_p, seed=f.seed, stop=tuple(stops), stream=f.stream,
                   return_token_ids=f.return_token_ids, timeout_s=f.timeout)


def job_from_openai(req: ChatCompletionRequest) -> ChatJob:
    turns: list[tuple[str, list[str | AudioInput]]] = []
    for i, msg in enumerate(req.messages):
        if isinstance(msg.content, str):
            turns.append((msg.role, [msg.content]))
            continue
        parts: list[str | AudioInput] = []
        for part in msg.content:
            if part.type == "text":
                parts.append(part.text)
            else:
                try:
                    data = base64.b64decode(part.input_audio.data, validate=True)
                except (binascii.Error, ValueError):
                    raise BadRequest(f"messages[{i}]: input_audio.data is not valid base64",
                                     code="invalid_base64", param="messages") from None
                parts.append(AudioInput(data, part.input_audio.format))
        turns.append((msg.role, parts))
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    return ChatJob(
        adapter=req.model, turns=turns, max_tokens=req.max_completion_tokens or req.max_tokens,
        temperature=req.temperature, top_p=req.top_p, seed=req.seed, stop=stop, stream=req.stream,
        include_usage=req.stream_options.include_usage if req.stream_options else True,
        return_token_ids=req.return_token_ids, timeout_s=req.timeout,
    )


def _parse_json_job(body: bytes, settings: Settings) -> ChatJob:
    try:
        raw = loads(body, max_bytes=settings.max_body_bytes(), max_depth=settings.max_json_depth,
                    max_nodes=settings.max_json_nodes)
    except JSONLimitError as e:
        if e.kind == "invalid":
            raise Unprocessable(f"the body is not valid JSON: {e.message}", code="invalid_json") from None
        raise BadRequest(f"the JSON body is refused: {e.message}", code=f"json_{e.kind}") from None
    try:
        req = ChatCompletionRequest.model_validate(raw)
    except ValidationError as e:
        raise first_error(e, "body") from None
    return job_from_openai(req)


async def job_from_json(body: bytes, headers: Headers, settings: Settings) -> ChatJob:
    # Parsing, validation and base64 are CPU work proportional to the body: off the event loop.
    return await asyncio.to_thread(_parse_json_job, body, settings)


# ---- chunks -> wire ------------------------------------------------------------------------------

class ClosingStream(StreamingResponse):
    """An SSE response that closes its chunk stream however the response ends (finished, client
    gone, error), so the engine request is aborted and the slot and lease are released at once
    rather than whenever GC finalises the generator."""

    def __init__(self, content: AsyncGenerator[str, None], *, media_type: str, headers: Mapping[str, str]) -> None:
        super().__init__(content, media_type=media_type, headers=headers)
        self._content = content

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._content.aclose()


ErrorEvent = Callable[[dict], dict]


async def guarded_sse(events: AsyncIterator[str], chunks: AsyncGenerator[ChatChunk, None],
                      error_event: ErrorEvent = lambda body: body) -> AsyncGenerator[str, None]:
    """``events``, then, if the pipeline fails mid-stream, one SSE error event (``error_event``
    shapes the ``{"error": ...}`` body for the wire format) instead of a dropped connection; the
    chunk stream is closed however it ends, so the engine request is aborted at once."""
    try:
        async for line in events:
            yield line
    except APIError as e:
        yield f"data: {json.dumps(error_event(e.to_dict()))}\n\n"
    except Exception:  # a bug mid-stream: say so in the stream rather than dropping the connection
        log.exception("stream failed")
        yield f"data: {json.dumps(error_event(APIError('internal server error mid-stream').to_dict()))}\n\n"
    finally:
        await chunks.aclose()


async def _sse(first: Started, chunks: AsyncGenerator[ChatChunk, None], job: ChatJob) -> AsyncGenerator[str, None]:
    """SSE lines: a role chunk, content deltas, the finish chunk, a usage chunk, [DONE]."""
    cid = f"chatcmpl-{first.request_id}"

    def event(choices: list[ChunkChoice], usage: Finished | None = None) -> str:
        chunk = ChatCompletionChunk(id=cid, created=first.created, model=first.model, choices=choices,
                                    usage=usage.usage if usage else None)
        return f"data: {chunk.model_dump_json(exclude_none=False)}\n\n"

    yield event([ChunkChoice(delta=Delta(role="assistant", content=""))])
    async for c in chunks:
        if isinstance(c, TextDelta):
            if c.text or c.finish_reason or (c.token_ids and job.return_token_ids):
                yield event([ChunkChoice(delta=Delta(content=c.text or None), finish_reason=c.finish_reason,
                                         token_ids=c.token_ids if job.return_token_ids else None)])
        elif isinstance(c, Finished) and job.include_usage:
            yield event([], c)
    yield "data: [DONE]\n\n"


async def _completion(first: Started, chunks: AsyncGenerator[ChatChunk, None], job: ChatJob) -> ChatCompletion:
    async def all_chunks() -> AsyncIterator[ChatChunk]:
        yield first
        async for c in chunks:
            yield c

    done = await collect(all_chunks())
    return ChatCompletion(
        id=f"chatcmpl-{done.request_id}", created=done.created, model=done.model,
        choices=[Choice(message=AssistantMessage(content=done.text), finish_reason=done.finish_reason,
                        token_ids=done.token_ids if job.return_token_ids else None)],
        usage=done.usage)


Renderer = Callable[[Started, AsyncIterator[ChatChunk], ChatJob], Awaitable[Response]]


async def render_chat(first: Started, chunks: AsyncIterator[ChatChunk], job: ChatJob) -> Response:
    """``chat.completion`` JSON, or SSE ``chat.completion.chunk`` events when the job streams."""
    if job.stream:
        return ClosingStream(guarded_sse(_sse(first, chunks, job), chunks), media_type="text/event-stream", headers=SSE_HEADERS)
    return JSONResponse((await _completion(first, chunks, job)).model_dump())


async def serve_job(request: Request, principal: Principal, parse: JobParser, render: Renderer = render_chat) -> Response:
    """Door → job → ``ChatService.run`` → rendered response; counts the answer by status code.

    Every route that runs the pipeline over HTTP (chat, transcriptions) goes through here; they
    differ only in how they parse the body into a job and render the chunks."""
    state: ServerState = request.app.state.aura
    service = state.service
    ctx = request_context(request, principal, state.settings)
    status = 500
    try:
        body = await receive(request, service, ctx)
        job = await parse(body, request.headers, state.settings)
        chunks = service.run(job, ctx)
        try:
            first = await anext(chunks)
            assert isinstance(first, Started)
            response = await render(first, chunks, job)
        except BaseException:
            await chunks.aclose()
            raise
        status = 200
        return response
    except APIError as e:
        status = e.status_code
        raise
    finally:
        request.app.state.metrics.count_request(ctx.adapter, ctx.tenant, status)


@router.post("/v1/audio/chat", response_model=ChatCompletion, responses=_ERRORS)
async def audio_chat(request: Request, principal: Principal = Depends(authenticate)):
    """A spoken question in, the answer out (streamed as SSE with ``stream=true``)."""
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        return await serve_job(request, principal, job_from_form)
    if ctype.startswith("application/json") or not ctype:
        return await serve_job(request, principal, job_from_json)
    raise UnsupportedMedia(f"Content-Type '{ctype}' is not accepted; send multipart/form-data or application/json",
                           code="unsupported_content_type")


@router.post("/v1/chat/completions", response_model=ChatCompletion, responses=_ERRORS)
async def chat_completions(request: Request, principal: Principal = Depends(authenticate)):
    """The same handler in OpenAI's JSON shape, so stock OpenAI clients work unchanged."""
    return await serve_job(request, principal, job_from_json)
