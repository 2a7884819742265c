"""POST /v1/audio/transcriptions in OpenAI's shape, so voice agents and the OpenAI SDKs work unchanged.

The adapter transcribes with the prompt it was trained with (``AuraAdapter.transcribe_prompt``),
through the same ``ChatService.run`` as every chat request: same admission, limits, adapter
lease, metrics. This module only maps OpenAI's multipart form to a ``transcribe`` job and the
chunks to ``json`` / ``text`` / ``verbose_json`` or to SSE ``transcript.text.delta`` events
ending with ``transcript.text.done``.

Formats that carry timestamps (``srt``, ``vtt``, word/segment granularities) are refused with 400:
an AuRA adapter emits text only, and invented timestamps would be worse than none.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import ValidationError
from starlette.datastructures import Headers

from server.config import Settings
from server.errors import BadRequest, PayloadTooLarge, UnsupportedMedia, first_error
from server.protocol import (
    TranscriptionForm, Transcription, TranscriptionInputDetails, TranscriptionUsage, TranscriptionVerbose,
    TranscriptTextDelta, TranscriptTextDone, error_responses,
)
from server.routes.chat import SSE_HEADERS, ClosingStream, guarded_sse, parse_form, read_upload, serve_job
from server.serving import ChatChunk, ChatJob, Finished, Started, TextDelta
from server.tenancy import Principal, authenticate

log = logging.getLogger("server")

router = APIRouter()

_ERRORS = error_responses(400, 401, 403, 404, 408, 413, 415, 422, 429, 503, 504)
_TIMESTAMPED = {"srt", "vtt", "diarized_json"}
# OpenAI's language names for the codes an English-first demo is most likely asked about; other
# codes are reported as given.
_LANGUAGES = {"en": "english"}


@dataclass
class _TranscriptionJob(ChatJob):
    """A transcribe job that remembers the wire options its renderer needs."""

    response_format: str = "json"
    language: str | None = None


def _usage(done: Finished) -> TranscriptionUsage:
    u = done.usage
    audio = u.prompt_tokens_details.audio_tokens
    return TranscriptionUsage(
        input_tokens=u.prompt_tokens, output_tokens=u.completion_tokens, total_tokens=u.total_tokens,
        input_token_details=TranscriptionInputDetails(audio_tokens=audio, text_tokens=u.prompt_tokens - audio),
        seconds=u.audio_seconds)


async def job_from_transcription_form(body: bytes, headers: Headers, settings: Settings) -> ChatJob:
    form = await parse_form(body, headers, settings)
    try:
        audio = await read_upload(form, settings, "the audio to transcribe")
        fields: dict[str, str | list[str]] = {}
        for key, value in form.multi_items():
            if not isinstance(value, str):
                continue
            if key.endswith("[]"):
                fields.setdefault(key, [])
                fields[key].append(value)  # type: ignore[union-attr]  # list fields only
            else:
                fields[key] = value
        try:
            f = TranscriptionForm.model_validate(fields)
        except ValidationError as e:
            raise first_error(e, "form") from None
    finally:
        await form.close()
    if f.response_format in _TIMESTAMPED or f.timestamp_granularities:
        raise BadRequest(f"response_format '{f.response_format}' and timestamp_granularities need timestamps, which "
                         "an AuRA adapter does not produce; use json, text or verbose_json",
                         code="unsupported_response_format", param="response_format")
    if f.include:
        raise BadRequest(f"include={f.include} is not supported (no logprobs); leave it out",
                         code="unsupported_include", param="include[]")
    # `model` is checked with every other job field by ChatService.check_job; `prompt` is not used.
    if f.prompt and len(f.prompt) > settings.max_prompt_chars:
        raise PayloadTooLarge(f"the prompt is {len(f.prompt)} characters; the limit is {settings.max_prompt_chars}",
                              code="prompt_too_long", param="prompt")
    return _TranscriptionJob(
        adapter=f.model, turns=[("user", [audio])],
        max_tokens=f.max_tokens or settings.max_tokens_limit, temperature=f.temperature, stream=f.stream, task="transcribe",
        response_format=f.response_format, language=f.language)


async def _deltas(chunks: AsyncIterator[ChatChunk]) -> AsyncIterator[str]:
    """SSE: ``transcript.text.delta`` per step, then ``transcript.text.done`` with text and usage."""
    texts: list[str] = []
    async for c in chunks:
        if isinstance(c, TextDelta) and c.text:
            texts.append(c.text)
            yield f"data: {TranscriptTextDelta(delta=c.text).model_dump_json()}\n\n"
        elif isinstance(c, Finished):
            done = TranscriptTextDone(text="".join(texts).strip(), usage=_usage(c))
            yield f"data: {done.model_dump_json()}\n\n"


async def render_transcription(first: Started, chunks: AsyncIterator[ChatChunk], job: ChatJob) -> Response:
    assert isinstance(job, _TranscriptionJob)
    if job.stream:
        return ClosingStream(guarded_sse(_deltas(chunks), chunks, lambda body: {'type': 'error', **body}), media_type="text/event-stream", headers=SSE_HEADERS)
    texts: list[str] = []
    done: Finished | None = None
    async for c in chunks:
        if isinstance(c, TextDelta):
            texts.append(c.text)
        elif isinstance(c, Finished):
            done = c
    assert done is not None, "run() always ends with Finished"
    text = "".join(texts).strip()
    if job.response_format == "text":
        return PlainTextResponse(text)
    usage = _usage(done)
    if job.response_format == "verbose_json":
        language = _LANGUAGES.get((job.language or "en").lower(), job.language or "english")
        body = TranscriptionVerbose(language=language, duration=usage.seconds, text=text, usage=usage)
        return JSONResponse(body.model_dump())
    return JSONResponse(Transcription(text=text, usage=usage).model_dump())


@router.post("/v1/audio/transcriptions", response_model=Transcription | TranscriptionVerbose, responses=_ERRORS)
async def transcriptions(request: Request, principal: Principal = Depends(authenticate)) -> Response:
    """Speech in, its transcript out (OpenAI's transcription API; ``model`` names the adapter)."""
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        raise UnsupportedMedia(f"Content-Type '{ctype}' is not accepted; send multipart/form-data with a 'file' part",
                               code="unsupported_content_type")
    return await serve_job(request, principal, job_from_transcription_form, render_transcription)
