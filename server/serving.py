"""The spoken-chat pipeline, independent of the web framework.

request -> (decode audio, features, adapter's audio layer) -> chat-template prompt with audio
spans -> engine -> OpenAI chat.completion or chat.completion.chunk stream.

Everything that can fail because of the request (bad audio, unknown adapter, too long a prompt)
fails in :meth:`ChatService.prepare`, before a stream starts, so it becomes a proper HTTP error
instead of a broken event stream.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import torch

from adapters.audio import AudioError
from adapters.prompt import AudioPart, Part, TextPart, Turn, build_prompt
from server.config import Settings
from server.engine.base import Engine, EngineDead, GenerationRequest, SamplingOptions
from server.errors import (
    APIError, BadRequest, PayloadTooLarge, ServiceUnavailable, UnsupportedMedia, Unprocessable,
)
from server.frontend import AudioFrontend, FrontendTimings
from server.limits import Deadline
from server.protocol import (
    AssistantMessage, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Choice, ChunkChoice,
    Delta, PromptTokensDetails, Usage,
)
from server.registry import AdapterRegistry, AdapterVersion

log = logging.getLogger(__name__)

_AUDIO_ERROR_STATUS: dict[str, type[APIError]] = {
    "too_large": PayloadTooLarge,
    "too_long": PayloadTooLarge,
    "unsupported": UnsupportedMedia,
    "corrupt": BadRequest,
    "empty": BadRequest,
    "bad_params": BadRequest,
}


def audio_error(e: AudioError) -> APIError:
    cls = _AUDIO_ERROR_STATUS.get(e.kind, BadRequest)
    return cls(e.message, code=f"audio_{e.kind}", param="file")


@dataclass
class AudioInput:
    data: bytes
    format: str | None = None


@dataclass
class ChatJob:
    """A request in one normal form, whichever shape (multipart or JSON) it arrived in."""

    adapter: str | None
    turns: list[tuple[str, list[str | AudioInput]]]
    max_tokens: int | None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = True
    return_token_ids: bool = False
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # Set by the route (server/limits.py): whose request it is, how long it may take, and when it
    # arrived (perf_counter, before waiting for admission) so TTFT/e2e include the queue.
    timeout_s: float | None = None
    tenant: str = "default"
    deadline: Deadline | None = None
    arrived_at: float | None = None
    admission_wait_s: float | None = None


@dataclass
class Prepared:
    job: ChatJob
    version: AdapterVersion
    request: GenerationRequest
    audio_seconds: float
    num_audio_tokens: int
    timings: FrontendTimings
    received_at: float


@dataclass
class RequestRecord:
    """What one finished request cost; handed to observers (metrics, logs)."""

    adapter: str
    status: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    audio_seconds: float = 0.0
    ttft_s: float | None = None
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    frontend: FrontendTimings | None = None
    tenant: str = "default"
    admission_wait_s: float | None = None


def job_from_openai(req: ChatCompletionRequest, request_id: str | None = None) -> ChatJob:
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
    job = ChatJob(
        adapter=req.model, turns=turns, max_tokens=req.max_completion_tokens or req.max_tokens,
        temperature=req.temperature, top_p=req.top_p, seed=req.seed, stop=stop, stream=req.stream,
        include_usage=req.stream_options.include_usage if req.stream_options else True,
        return_token_ids=req.return_token_ids, timeout_s=req.timeout,
    )
    if request_id:
        job.request_id = request_id
    return job


class ChatService:
    def __init__(self, settings: Settings, engine: Engine, registry: AdapterRegistry,
                 frontend: AudioFrontend, tokenizer: Any, model_name: str) -> None:
        self.settings = settings
        self.engine = engine
        self.registry = registry
        self.frontend = frontend
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.observers: list[Any] = []

    def resolve_adapter(self, name: str | None, default: str | None = None) -> str:
        """The adapter a request runs on: the one it names, else ``default`` (the caller's tenant
        default), else the server's default. The base model's name also means "the default"."""
        if name in (None, "", self.model_name) or name == "default":
            if default:
                return default
            if self.registry.default is None:
                raise ServiceUnavailable("no adapter is loaded; load one with POST /v1/adapters", code="no_adapter")
            return self.registry.default
        return name

    def _max_tokens(self, job: ChatJob, prompt_len: int) -> int:
        limit = self.settings.max_tokens_limit
        wanted = job.max_tokens or self.settings.default_max_tokens
        if wanted > limit:
            raise BadRequest(f"max_tokens={wanted} exceeds this server's limit of {limit}; ask for fewer",
                             code="max_tokens_too_large", param="max_tokens")
        room = self.settings.max_model_len - prompt_len
        if room < 1:
            raise BadRequest(
                f"the prompt is {prompt_len} tokens (audio included) and the model's context is "
                f"{self.settings.max_model_len}; send shorter audio or text", code="context_length_exceeded")
        return min(wanted, room)

    async def prepare(self, job: ChatJob, version: AdapterVersion) -> Prepared:
        received = job.arrived_at or time.perf_counter()
        adapter = version.adapter
        sr = adapter.config.features.sample_rate
        timings = FrontendTimings(batch_size=0)
        audio_seconds = 0.0
        embeds: list[torch.Tensor] = []
        turns: list[Turn] = []
        for role, raw_parts in job.turns:
            parts: list[Part] = []
            for p in raw_parts:
                if isinstance(p, str):
                    if p:
                        parts.append(TextPart(p))
                    continue
                try:
                    decoded, decode_s = await self.frontend.decode(p.data, sr)
                except AudioError as e:
                    raise audio_error(e) from None
                if self.settings.max_audio_seconds and audio_seconds + decoded.duration_s > self.settings.max_audio_seconds:
                    raise PayloadTooLarge(
                        f"the request holds {audio_seconds + decoded.duration_s:.1f} s of audio; the limit is "
                        f"{self.settings.max_audio_seconds:g} s", code="audio_too_long", param="file")
                if job.deadline is not None:
                    job.deadline.check("decoding audio")
                vectors, t = await self.frontend.embed(adapter, decoded.samples)
                audio_seconds += decoded.duration_s
                timings.decode_s += decode_s
                timings.queue_s += t.queue_s
                timings.features_s += t.features_s
                timings.embed_s += t.embed_s
                timings.batch_size = max(timings.batch_size, t.batch_size)
                embeds.append(vectors)
                parts.append(AudioPart(vectors.shape[0]))
            if role == "assistant" and not parts:
                continue
            turns.append(Turn(role, tuple(parts)))
        if not turns:
            raise Unprocessable("the request has no message content", code="empty_messages", param="messages")
        prompt = build_prompt(self.tokenizer, adapter.config.prompt, turns, placeholder_id=0)
        audio = torch.cat(embeds) if embeds else torch.zeros(0, self.engine.hidden_size)
        sampling = SamplingOptions(
            max_tokens=self._max_tokens(job, len(prompt.token_ids)), temperature=job.temperature,
            top_p=job.top_p, seed=job.seed, stop=job.stop,
        )
        request = GenerationRequest(
            request_id=f"{job.request_id}-{uuid.uuid4().hex[:8]}", token_ids=prompt.token_ids,
            is_token_ids=prompt.is_token_ids, audio_embeds=audio, sampling=sampling, lora=version.lora,
        )
        return Prepared(job, version, request, audio_seconds, prompt.num_audio_tokens, timings, received)

    def _usage(self, p: Prepared, completion_tokens: int) -> Usage:
        n_prompt = p.request.num_prompt_tokens
        return Usage(prompt_tokens=n_prompt, completion_tokens=completion_tokens,
                     total_tokens=n_prompt + completion_tokens, audio_seconds=round(p.audio_seconds, 3),
                     prompt_tokens_details=PromptTokensDetails(audio_tokens=p.num_audio_tokens))

    def _notify(self, record: RequestRecord) -> None:
        for obs in self.observers:
            try:
                obs(record)
            except Exception:
                log.exception("observer failed")

    async def _generate(self, p: Prepared) -> AsyncIterator[tuple[str, list[int], str | None, int]]:
        """(text delta, new token ids, finish_reason, completion tokens so far), timing as it goes."""
        record = RequestRecord(adapter=p.version.name, status="ok", audio_seconds=p.audio_seconds,
                               prompt_tokens=p.request.num_prompt_tokens, frontend=p.timings,
                               tenant=p.job.tenant, admission_wait_s=p.job.admission_wait_s)
        last = None
        deadline = p.job.deadline
        stream = self.engine.generate(p.request)
        try:
            while True:
                if deadline is None:
                    chunk = await anext(stream, None)
                else:
                    try:
                        # Cancelling the pending read on timeout aborts the engine request.
                        chunk = await asyncio.wait_for(anext(stream, None), max(0.0, deadline.remaining()))
                    except asyncio.TimeoutError:
                        record.status = "deadline"
                        raise deadline.error("generating") from None
                if chunk is None:
                    break
                now = time.perf_counter()
                if chunk.token_ids:
                    if record.ttft_s is None:
                        record.ttft_s = now - p.received_at
                    elif last is not None:
                        record.itl_s.append((now - last) / len(chunk.token_ids))
                    last = now
                record.completion_tokens = chunk.num_output_tokens
                yield chunk.text, chunk.token_ids, chunk.finish_reason, chunk.num_output_tokens
        except EngineDead as e:
            record.status = "engine_dead"
            raise ServiceUnavailable(str(e), code="engine_unavailable") from e
        except BaseException:
            if record.status == "ok":
                record.status = "aborted"
            raise
        finally:
            record.e2e_s = time.perf_counter() - p.received_at
            try:
                await stream.aclose()  # no-op when finished; aborts the engine request otherwise
            finally:
                self._notify(record)

    async def complete(self, p: Prepared) -> ChatCompletion:
        texts: list[str] = []
        ids: list[int] = []
        finish, n = None, 0
        async for text, token_ids, finish_reason, n in self._generate(p):
            texts.append(text)
            ids += token_ids
            finish = finish_reason or finish
        return ChatCompletion(
            id=f"chatcmpl-{p.job.request_id}", model=p.version.name,
            choices=[Choice(message=AssistantMessage(content="".join(texts)), finish_reason=finish,
                            token_ids=ids if p.job.return_token_ids else None)],
            usage=self._usage(p, n),
        )

    async def stream(self, p: Prepared) -> AsyncIterator[str]:
        """SSE lines: a role chunk, content deltas, the finish chunk, a usage chunk, [DONE]."""
        created = int(time.time())
        cid = f"chatcmpl-{p.job.request_id}"

        def event(choices: list[ChunkChoice], usage: Usage | None = None) -> str:
            chunk = ChatCompletionChunk(id=cid, created=created, model=p.version.name, choices=choices, usage=usage)
            return f"data: {chunk.model_dump_json(exclude_none=False)}\n\n"

        yield event([ChunkChoice(delta=Delta(role="assistant", content=""))])
        n = 0
        try:
            async for text, token_ids, finish, n in self._generate(p):
                if text or finish or (token_ids and p.job.return_token_ids):
                    yield event([ChunkChoice(delta=Delta(content=text or None), finish_reason=finish,
                                             token_ids=token_ids if p.job.return_token_ids else None)])
        except APIError as e:
            yield f"data: {json.dumps(e.to_dict())}\n\n"
            return
        if p.job.include_usage:
            yield event([], self._usage(p, n))
        yield "data: [DONE]\n\n"
