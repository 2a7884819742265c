"""The spoken-chat pipeline, independent of the web framework: one ``run`` for every entry point.

:meth:`ChatService.run` owns the whole sequence — admit → resolve adapter → authorise → lease the
adapter version → decode/features/audio layer → prompt → generate → release — and yields typed
chunks (:class:`Started`, :class:`TextDelta`, :class:`Finished`). The HTTP routes only turn a wire
format into a :class:`ChatJob` and these chunks into JSON or SSE; benchmarks, ``aura eval`` and
the parity tests call the same ``run``, so every number measures the served path.

Everything that can fail because of the request (bad audio, unknown adapter, too long a prompt)
fails before :class:`Started` is yielded, so an HTTP caller can still answer with a proper error
status instead of a broken event stream. CPU work (tokenisation, decoding, features) runs off the
event loop, so one large request never stalls the others or ``/health``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from transformers import PreTrainedTokenizerBase

from adapters.audio import AudioError
from adapters.prompt import AudioPart, Part, TextPart, Turn, build_prompt
from server.admission import AdmissionController
from server.config import Settings
from server.context import RequestContext
from server.engine.base import Engine, EngineDead, GenerationRequest, SamplingOptions
from server.errors import BadRequest, PayloadTooLarge, ServiceUnavailable, Unprocessable, error_for_kind
from server.frontend import AudioFrontend, FrontendTimings
from server.protocol import PromptTokensDetails, Usage
from server.registry import AdapterRegistry, AdapterVersion

log = logging.getLogger(__name__)

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed (both engines) accepts


@dataclass
class AudioInput:
    data: bytes
    format: str | None = None


@dataclass
class ChatJob:
    """What to generate, in one normal form whichever wire shape (multipart, JSON) it came in.

    Who asked and by when it must be done travel beside it in a :class:`RequestContext`.
    """

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
    timeout_s: float | None = None  # the request's own deadline wish, capped by the server's
    # "transcribe": the adapter's own training transcription prompt follows the audio of the user
    # turn (known only once the adapter version is leased, hence a task rather than a text part).
    task: Literal["chat", "transcribe"] = "chat"
    # Audio vectors an earlier prefill computed for a prefix of this job's first audio part (a
    # realtime session's warm-up). Leading positions that equal them within float noise are taken
    # from them bit for bit: vLLM's prefix cache hashes the exact bytes of prompt embeddings, and a
    # GEMM over a longer clip may round differently in the last bit.
    reuse_audio: torch.Tensor | None = None


# ---- the typed chunks run() yields ---------------------------------------------------------------

@dataclass(frozen=True)
class Started:
    """Admitted, authorised, prompt built: from here on only the engine or the deadline can fail."""

    request_id: str
    model: str
    created: int


@dataclass(frozen=True)
class TextDelta:
    """New output since the previous chunk."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    completion_tokens: int


@dataclass(frozen=True)
class Finished:
    finish_reason: str | None
    usage: Usage


ChatChunk = Started | TextDelta | Finished


@dataclass
class Completion:
    """A whole answer, collected from the chunks (non-streaming responses, benchmarks, eval)."""

    request_id: str
    model: str
    created: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    usage: Usage


async def collect(chunks: AsyncIterator[ChatChunk]) -> Completion:
    started: Started | None = None
    texts: list[str] = []
    ids: list[int] = []
    finish: str | None = None
    usage: Usage | None = None
    async for c in chunks:
        if isinstance(c, Started):
            started = c
        elif isinstance(c, TextDelta):
            texts.append(c.text)
            ids += c.token_ids
            finish = c.finish_reason or finish
        else:
            usage = c.usage
            finish = c.finish_reason or finish
    assert started is not None and usage is not None, "run() always yields Started first and Finished last"
    return Completion(started.request_id, started.model, started.created, "".join(texts), ids, finish, usage)


@dataclass
class Prepared:
    job: ChatJob
    version: AdapterVersion
    request: GenerationRequest
    audio_seconds: float
    num_audio_tokens: int
    timings: FrontendTimings


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


Observer = Callable[[RequestRecord], None]


REUSE_ATOL = 1e-5  # float noise of the audio layer's GEMMs; real changes (a new log-mel peak) are far larger


def reuse_prefix(vectors: torch.Tensor, earlier: torch.Tensor, atol: float = REUSE_ATOL) -> torch.Tensor:
    """``vectors`` with its longest leading run of positions that match ``earlier`` within
    ``atol`` replaced by ``earlier``'s exact values (a copy; ``vectors`` is not changed)."""
    n = min(len(vectors), len(earlier))
    if n == 0:
        return vectors
    close = ((vectors[:n] - earlier[:n]).abs().amax(dim=1) <= atol).tolist()
    k = close.index(False) if False in close else n
    if k == 0:
        return vectors
    out = vectors.clone()
    out[:k] = earlier[:k]
    return out


def _check_text(value: str, param: str) -> None:
    """Lone surrogates (``"\\ud800"`` in JSON) cannot be tokenised, logged or echoed: refuse them here."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"'{param}' holds a lone UTF-16 surrogate (e.g. \\ud800); send valid Unicode text",
                         code="invalid_text", param=param) from None


class ChatService:
    """The one pipeline. Built once per server (``server/state.py``); stateless per request."""

    def __init__(self, settings: Settings, engine: Engine, registry: AdapterRegistry, frontend: AudioFrontend,
                 tokenizer: PreTrainedTokenizerBase, model_name: str, admission: AdmissionController) -> None:
        self.settings = settings
        self.engine = engine
        self.registry = registry
        self.frontend = frontend
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.admission = admission
        self.observers: list[Observer] = []

    # ---- admission-time checks (also used by the HTTP door before it reads a body) -------------

    async def check_accepting(self) -> None:
        """Refuse at once what cannot be served now: draining (503) or a dead engine (503)."""
        self.admission.check_open()
        try:
            await self.engine.check_health()
        except EngineDead as e:
            raise ServiceUnavailable(f"the inference engine is not available: {e}", code="engine_unavailable") from e

    def check_job(self, job: ChatJob) -> None:
        """Every size and range the caller controls, checked before any work is done."""
        s = self.settings
        if job.adapter is not None:
            _check_text(job.adapter, "model")
        if len(job.stop) > s.max_stop_strings:
            raise BadRequest(f"{len(job.stop)} stop strings; at most {s.max_stop_strings} are accepted",
                             code="too_many_stop_strings", param="stop")
        for stop in job.stop:
            if not stop:
                raise BadRequest("stop strings must not be empty", code="empty_stop_string", param="stop")
            if len(stop) > s.max_stop_chars:
                raise BadRequest(f"a stop string is {len(stop)} characters; the limit is {s.max_stop_chars}",
                                 code="stop_string_too_long", param="stop")
            _check_text(stop, "stop")
        if job.seed is not None and not SEED_MIN <= job.seed <= SEED_MAX:
            raise BadRequest(f"seed must be between {SEED_MIN} and {SEED_MAX}", code="invalid_seed", param="seed")
        chars = 0
        for _, parts in job.turns:
            for p in parts:
                if isinstance(p, str):
                    chars += len(p)
                    _check_text(p, "messages")
        if chars > s.max_prompt_chars:
            raise PayloadTooLarge(f"the text of the request is {chars} characters; the limit is "
                                  f"{s.max_prompt_chars}", code="prompt_too_long", param="messages")

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

    # ---- the pipeline ---------------------------------------------------------------------------

    async def run(self, job: ChatJob, ctx: RequestContext) -> AsyncGenerator[ChatChunk, None]:
        """Admit → resolve → authorise → lease → decode/embed → generate → release, as chunks.

        Closing the iterator early (a client gone) aborts the engine request and releases the
        slot and the lease; so does any error. Errors before :class:`Started` are the caller's.
        """
        self.check_job(job)
        await self.check_accepting()
        ctx.deadline = ctx.deadline.tighten(job.timeout_s)
        ctx.slot = await self.admission.acquire(ctx.tenant, timeout=ctx.deadline.remaining())
        lease = None
        try:
            name = self.resolve_adapter(job.adapter, ctx.principal.default_adapter)
            ctx.principal.check_adapter(name)
            ctx.adapter = name
            lease = self.registry.lease(name)
            prepared = await self.prepare(job, ctx, lease.version)
            yield Started(ctx.request_id, prepared.version.name, int(time.time()))
            async for chunk in self._generate(prepared, ctx):
                yield chunk
        finally:
            if lease is not None:
                lease.release()
            ctx.slot.release()

    async def prefill(self, job: ChatJob, ctx: RequestContext) -> torch.Tensor:
        """Compute the job's prompt into the engine's prefix cache, answering nothing.

        For realtime sessions that warm the cache while the user is still speaking: one output
        token, discarded; no pipeline slot (a session keeps at most one prefill in flight, and the
        real request that follows is admitted as usual) and no metrics record. The same checks as
        :meth:`run` apply: the caller must be allowed the adapter. Returns the audio vectors it
        used, for the next job's ``reuse_audio``."""
        self.check_job(job)
        await self.check_accepting()
        name = self.resolve_adapter(job.adapter, ctx.principal.default_adapter)
        ctx.principal.check_adapter(name)
        lease = self.registry.lease(name)
        try:
            prepared = await self.prepare(job, ctx, lease.version)
            request = replace(prepared.request, sampling=replace(prepared.request.sampling, max_tokens=1))
            stream = self.engine.generate(request)
            try:
                async for _ in stream:
                    pass
            finally:
                await stream.aclose()
            return prepared.request.audio_embeds
        finally:
            lease.release()

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

    async def prepare(self, job: ChatJob, ctx: RequestContext, version: AdapterVersion) -> Prepared:
        """Decode, embed and build the engine request (also what the benchmark's engine-only phase sends)."""
        adapter = version.adapter
        features = adapter.config.features
        timings = FrontendTimings(batch_size=0)
        audio_seconds = 0.0
        embeds: list[torch.Tensor] = []
        turns: list[Turn] = []
        for role, raw_parts in job.turns:
            if job.task == "transcribe" and role == "user":
                raw_parts = [*raw_parts, adapter.transcribe_prompt]
            parts: list[Part] = []
            for p in raw_parts:
                if isinstance(p, str):
                    if p:
                        parts.append(TextPart(p))
                    continue
                try:
                    decoded, decode_s = await self.frontend.decode(p.data, features.sample_rate)
                except AudioError as e:
                    raise error_for_kind(e.kind, e.message, family="audio", param="file") from None
                if self.settings.max_audio_seconds and audio_seconds + decoded.duration_s > self.settings.max_audio_seconds:
                    raise PayloadTooLarge(
                        f"the request holds {audio_seconds + decoded.duration_s:.1f} s of audio; the limit is "
                        f"{self.settings.max_audio_seconds:g} s", code="audio_too_long", param="file")
                if adapter.config.audio_layer.num_tokens(features.num_frames(len(decoded.samples))) < 1:
                    raise BadRequest(
                        f"the audio is {decoded.duration_s * 1000:.0f} ms long, too short to make one audio token; "
                        "send at least a few tens of milliseconds", code="audio_too_short", param="file")
                ctx.deadline.check("decoding audio")
                vectors, t = await self.frontend.embed(adapter, decoded.samples)
                if not embeds and job.reuse_audio is not None:
                    vectors = reuse_prefix(vectors, job.reuse_audio)
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
        # The chat template and the tokenizer are CPU work proportional to the text: off the loop.
        prompt = await asyncio.to_thread(build_prompt, self.tokenizer, adapter.config.prompt, turns, placeholder_id=0)
        audio = torch.cat(embeds) if embeds else torch.zeros(0, self.engine.hidden_size)
        sampling = SamplingOptions(
            max_tokens=self._max_tokens(job, len(prompt.token_ids)), temperature=job.temperature,
            top_p=job.top_p, seed=job.seed, stop=job.stop,
        )
        request = GenerationRequest(
            request_id=f"{ctx.request_id}-{uuid.uuid4().hex[:8]}", token_ids=prompt.token_ids,
            is_token_ids=prompt.is_token_ids, audio_embeds=audio, sampling=sampling, lora=version.engine_lora,
        )
        return Prepared(job, version, request, audio_seconds, prompt.num_audio_tokens, timings)

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

    async def _generate(self, p: Prepared, ctx: RequestContext) -> AsyncGenerator[TextDelta | Finished, None]:
        """The engine's output as chunks, timing as it goes; one :class:`RequestRecord` at the end."""
        record = RequestRecord(adapter=p.version.name, status="ok", audio_seconds=p.audio_seconds,
                               prompt_tokens=p.request.num_prompt_tokens, frontend=p.timings,
                               tenant=ctx.tenant, admission_wait_s=ctx.admission_wait_s)
        last = None
        finish = None
        deadline = ctx.deadline
        stream = self.engine.generate(p.request)
        try:
            while True:
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
                        record.ttft_s = now - ctx.arrived_at
                    elif last is not None:
                        record.itl_s.append((now - last) / len(chunk.token_ids))
                    last = now
                record.completion_tokens = chunk.num_output_tokens
                finish = chunk.finish_reason or finish
                yield TextDelta(chunk.text, chunk.token_ids, chunk.finish_reason, chunk.num_output_tokens)
        except EngineDead as e:
            record.status = "engine_dead"
            raise ServiceUnavailable(str(e), code="engine_unavailable") from e
        except BaseException:
            if record.status == "ok":
                record.status = "aborted"
            raise
        finally:
            record.e2e_s = time.perf_counter() - ctx.arrived_at
            try:
                await stream.aclose()  # no-op when finished; aborts the engine request otherwise
            finally:
                self._notify(record)
        yield Finished(finish, self._usage(p, record.completion_tokens))
