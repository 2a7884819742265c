"""One realtime voice session: OpenAI Realtime's GA events over any message transport.

Why a class apart from the WebSocket route: the route only authenticates, accepts and moves
JSON text in and out; everything a session does — its audio buffer, voice activity detection,
turns, responses through ``ChatService.run``, cancellation, prefix-cache warming — lives here,
so a Ray replica or a test can drive the same session without a socket.

What is faithful to OpenAI and what is not:
- Events and fields follow the GA names (``session.update``, ``input_audio_buffer.*``,
  ``response.create``/``cancel``; ``response.output_text.delta``/``done``, ``response.done`` with
  usage, ``error`` with a code). Output is text only.
- Each response answers the last committed audio turn (plus the session's ``instructions`` as a
  system message): AuRA adapters are trained single-turn, so earlier turns are not replayed.
- Committed audio becomes a WAV and goes through the same decode → features → audio layer →
  engine path as ``POST /v1/audio/chat``, so a realtime answer is token-identical to posting
  the same clip.

Prefill while the user speaks: AuRA's audio vectors come from a local convolution and blocks that
see at most ``encoder_lookahead`` frames ahead, and the LLM attends causally, so the KV cache of
early audio never depends on audio more than a few frames later. Every
``realtime_prefill_interval_ms`` of new speech the session sends the prompt-so-far to the engine
with one output token (``ChatService.prefill``); vLLM's prefix cache keeps those blocks, and at
end of speech only the tail is computed. Whisper's log-mel clamp (max − 8 dB over the clip) is
the one clip-global step: the final request always uses the exact offline features, so the
answer is unchanged; warming only pays off for blocks whose vectors did not move, which is all
of them but the last few positions (the lookahead's) unless a later sound is louder than every
earlier one.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
import time
import uuid
import wave
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import torch
from pydantic import TypeAdapter, ValidationError

from server.admission import Deadline
from server.context import RequestContext
from server.errors import APIError, first_error_text
from server.protocol import (
    REALTIME_CLIENT_EVENTS, InputAudioBufferAppend, InputAudioBufferClear, InputAudioBufferCommit,
    RealtimeClientEvent, RealtimeSession, RealtimeTurnDetection, RealtimeUsage, ResponseCancel, ResponseCreate,
    SessionUpdate,
)
from server.serving import AudioInput, ChatJob, ChatService, Finished, Started, TextDelta
from server.tenancy import Principal

log = logging.getLogger("server.realtime")

Send = Callable[[dict[str, Any]], Awaitable[None]]
_EVENT = TypeAdapter(RealtimeClientEvent)
_MIN_COMMIT_MS = 100  # OpenAI's minimum for a commit


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


def pcm16_wav(pcm: bytes, rate: int) -> bytes:
    """A WAV container around raw PCM16 mono, so committed audio takes the one decode path."""
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)
    return out.getvalue()


class VoiceActivity:
    """Energy-based voice activity on 20 ms frames: speech starts at the first loud frame and
    stops after ``silence_duration_ms`` of quiet frames. ``threshold`` 0..1 maps to -70..-10 dBFS."""

    FRAME_MS = 20

    def __init__(self, cfg: RealtimeTurnDetection, rate: int) -> None:
        self.cfg = cfg
        self.frame = rate * self.FRAME_MS // 1000
        self.level_db = -70.0 + 60.0 * cfg.threshold
        self._pending = np.zeros(0, dtype=np.int16)
        self._ms = 0  # audio fed so far (ms)
        self.speaking = False
        self._quiet_ms = 0

    def feed(self, samples: np.ndarray) -> list[tuple[str, int]]:
        """("started", ms) / ("stopped", ms) events, in order, for the new samples."""
        events: list[tuple[str, int]] = []
        data = np.concatenate([self._pending, samples])
        n = len(data) // self.frame
        for i in range(n):
            frame = data[i * self.frame:(i + 1) * self.frame].astype(np.float32) / 32768.0
            rms_db = 10.0 * np.log10(float(np.mean(frame * frame)) + 1e-12)
            loud = rms_db > self.level_db
            if loud and not self.speaking:
                self.speaking = True
                events.append(("started", max(0, self._ms - self.cfg.prefix_padding_ms)))
            if self.speaking:
                self._quiet_ms = 0 if loud else self._quiet_ms + self.FRAME_MS
                if self._quiet_ms >= self.cfg.silence_duration_ms:
                    self.speaking = False
                    self._quiet_ms = 0
                    events.append(("stopped", self._ms + self.FRAME_MS))
            self._ms += self.FRAME_MS
        self._pending = data[n * self.frame:]
        return events


class RealtimeConversation:
    """The state and event handling of one session. ``send`` delivers a server event."""

    def __init__(self, service: ChatService, principal: Principal, tenant: str, send: Send, *,
                 model: str | None = None) -> None:
        self.service = service
        self.settings = service.settings
        self.principal = principal
        self.tenant = tenant
        self._send = send
        self.session = RealtimeSession(id=_id("sess"), model=model)
        self.buffer = bytearray()
        self.written_ms = 0
        self.item_id = _id("item")  # the user item the current buffer will become
        # committed (item id, WAV, warm-up vectors), awaiting a response
        self.last_item: tuple[str, bytes, torch.Tensor | None] | None = None
        self.previous_item_id: str | None = None
        self.response: asyncio.Task[None] | None = None
        self._response_id: str | None = None
        self._vad = self._new_vad()
        self._warm: asyncio.Task[None] | None = None
        self._warmed_bytes = 0
        self._warm_vectors: torch.Tensor | None = None  # what the last warm-up sent, for reuse_audio

    # ---- plumbing ---------------------------------------------------------------------------

    async def send(self, type_: str, **fields: Any) -> None:
        await self._send({"type": type_, "event_id": _id("event"), **fields})

    async def error(self, message: str, code: str, *, type_: str = "invalid_request_error",
                    param: str | None = None, event_id: str | None = None) -> None:
        await self.send("error", error={"type": type_, "code": code, "message": message, "param": param,
                                        "event_id": event_id})

    @property
    def rate(self) -> int:
        return self.session.audio.input.format.rate

    def _new_vad(self) -> VoiceActivity | None:
        td = self.session.audio.input.turn_detection
        return VoiceActivity(td, self.rate) if td is not None else None

    async def start(self) -> None:
        await self.send("session.created", session=self.session.model_dump())

    async def close(self) -> None:
        for task in (self.response, self._warm):
            if task is not None and not task.done():
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, Exception):  # noqa: BLE001 - closing; outcome already sent
                    pass

    # ---- events -----------------------------------------------------------------------------

    async def handle(self, text: str) -> None:
        """One client event (JSON text). Every problem becomes an ``error`` event; the session goes on."""
        if len(text) > self.settings.realtime_max_event_bytes:
            await self.error(f"the event is {len(text)} bytes; the limit is {self.settings.realtime_max_event_bytes}; "
                             "send audio in smaller appends", "event_too_large")
            return
        try:
            raw = json.loads(text)
        except ValueError as e:
            await self.error(f"the event is not valid JSON: {e}", "invalid_json")
            return
        if not isinstance(raw, dict) or raw.get("type") not in REALTIME_CLIENT_EVENTS:
            kind = raw.get("type") if isinstance(raw, dict) else None
            await self.error(f"unknown or unsupported event type {str(kind)[:64]!r}; supported: "
                             f"{', '.join(REALTIME_CLIENT_EVENTS)}", "invalid_event", param="type")
            return
        event_id = raw.get("event_id") if isinstance(raw.get("event_id"), str) else None
        try:
            event = _EVENT.validate_python(raw)
        except ValidationError as e:
            loc, msg = first_error_text(e.errors(), "event")
            await self.error(f"event field '{loc}': {msg}", "invalid_value", param=loc, event_id=event_id)
            return
        try:
            if isinstance(event, SessionUpdate):
                await self.update_session(event)
            elif isinstance(event, InputAudioBufferAppend):
                await self.append(event)
            elif isinstance(event, InputAudioBufferCommit):
                await self.commit()
            elif isinstance(event, InputAudioBufferClear):
                self._reset_buffer()
                await self.send("input_audio_buffer.cleared")
            elif isinstance(event, ResponseCreate):
                await self.create_response(event)
            elif isinstance(event, ResponseCancel):
                await self.cancel_response()
        except APIError as e:
            await self.error(e.message, e.code, type_=e.type, param=e.param, event_id=event_id)

    async def update_session(self, event: SessionUpdate) -> None:
        merged = self.session.model_dump()
        for key, value in event.session.items():
            if key in ("id", "object"):
                continue
            if key == "audio" and isinstance(value, dict):
                audio = merged["audio"]
                for k, v in (value.get("input") or {}).items():
                    audio["input"][k] = v
            else:
                merged[key] = value
        try:
            session = RealtimeSession.model_validate(merged)
        except ValidationError as e:
            loc, msg = first_error_text(e.errors(), "session")
            raise _EventError(f"session field '{loc}': {msg}", "invalid_value", loc) from None
        if session.audio.input.format.rate != self.rate and self.buffer:
            raise _EventError("the input sample rate cannot change while audio is buffered; commit or clear first",
                              "invalid_value", "session.audio.input.format.rate")
        if session.model is not None and session.model != self.session.model:
            name = self.service.resolve_adapter(session.model, self.principal.default_adapter)
            self.principal.check_adapter(name)
            self.service.registry.get(name)  # 404 now rather than at the first response
        self.session = session
        self._vad = self._new_vad()
        await self.send("session.updated", session=self.session.model_dump())

    def _reset_buffer(self) -> None:
        self.buffer.clear()
        self._warmed_bytes = 0
        self._warm_vectors = None
        self._vad = self._new_vad()

    async def append(self, event: InputAudioBufferAppend) -> None:
        try:
            pcm = base64.b64decode(event.audio, validate=True)
        except (binascii.Error, ValueError):
            raise _EventError("audio is not valid base64 (PCM16 little-endian mono)", "invalid_audio", "audio") from None
        if len(pcm) % 2:
            raise _EventError("audio must hold whole 16-bit samples (an even number of bytes)", "invalid_audio", "audio")
        limit = int(self.settings.max_audio_seconds * self.rate) * 2
        if len(self.buffer) + len(pcm) > limit:
            raise _EventError(f"the input audio buffer would exceed {self.settings.max_audio_seconds:g} s; commit or "
                              "clear it first", "input_audio_buffer_full", "audio")
        self.buffer += pcm
        self.written_ms += len(pcm) * 1000 // (2 * self.rate)
        if self._vad is not None:
            for kind, ms in self._vad.feed(np.frombuffer(pcm, dtype="<i2")):
                if kind == "started":
                    await self.send("input_audio_buffer.speech_started", audio_start_ms=ms, item_id=self.item_id)
                else:
                    await self.send("input_audio_buffer.speech_stopped", audio_end_ms=ms, item_id=self.item_id)
                    td = self.session.audio.input.turn_detection
                    await self.commit()
                    if td is not None and td.create_response:
                        await self.create_response(ResponseCreate(type="response.create"))
                    return
        self._maybe_prefill()

    async def commit(self) -> None:
        ms = len(self.buffer) * 1000 // (2 * self.rate)
        if ms < _MIN_COMMIT_MS:
            raise _EventError(f"the input audio buffer holds {ms} ms; at least {_MIN_COMMIT_MS} ms are needed to commit",
                              "input_audio_buffer_commit_empty", None)
        item_id = self.item_id
        if self._warm is not None and not self._warm.done():
            await asyncio.wait([self._warm])  # its vectors are what the cache holds
        self.last_item = (item_id, pcm16_wav(bytes(self.buffer), self.rate), self._warm_vectors)
        self._reset_buffer()
        self.item_id = _id("item")
        await self.send("input_audio_buffer.committed", item_id=item_id, previous_item_id=self.previous_item_id)
        await self.send("conversation.item.added", previous_item_id=self.previous_item_id, item={
            "id": item_id, "object": "realtime.item", "type": "message", "role": "user", "status": "completed",
            "content": [{"type": "input_audio", "transcript": None}]})
        self.previous_item_id = item_id

    # ---- responses --------------------------------------------------------------------------

    def _job(self, wav: bytes, max_tokens: int | None, instructions: str | None, stream: bool = True,
             reuse: torch.Tensor | None = None) -> ChatJob:
        turns: list[tuple[str, list[str | AudioInput]]] = []
        if instructions:
            turns.append(("system", [instructions]))
        turns.append(("user", [AudioInput(wav, "wav")]))
        return ChatJob(adapter=self.session.model, turns=turns, max_tokens=max_tokens, stream=stream,
                       reuse_audio=reuse)

    def _context(self) -> RequestContext:
        return RequestContext(principal=self.principal, tenant=self.tenant,
                              deadline=Deadline.after(self.settings.request_timeout_s))

    async def create_response(self, event: ResponseCreate) -> None:
        if self.response is not None and not self.response.done():
            raise _EventError("a response is already in progress; cancel it or wait for response.done",
                              "conversation_already_has_active_response", None)
        if self.last_item is None:
            raise _EventError("there is no committed audio to respond to; append audio and commit first",
                              "no_input_audio", None)
        limit = event.response.max_output_tokens or self.session.max_output_tokens
        max_tokens = None if limit == "inf" else int(limit)
        instructions = event.response.instructions if event.response.instructions is not None \
            else self.session.instructions
        item_id, wav, warm = self.last_item
        self.last_item = None
        self._response_id = _id("resp")
        job = self._job(wav, max_tokens, instructions, reuse=warm if instructions == self.session.instructions else None)
        self.response = asyncio.create_task(self._respond(self._response_id, job))

    async def cancel_response(self) -> None:
        if self.response is None or self.response.done():
            raise _EventError("no response is in progress", "response_cancel_not_active", None)
        self.response.cancel()
        try:
            await self.response
        except asyncio.CancelledError:
            pass

    async def _respond(self, response_id: str, job: ChatJob) -> None:
        """Run the job through the pipeline and report it as response events, whatever happens."""
        out_id = _id("item")
        texts: list[str] = []
        status, usage, error = "completed", None, None
        await self.send("response.created", response={"id": response_id, "object": "realtime.response",
                                                      "status": "in_progress", "output": []})
        chunks = self.service.run(job, self._context())
        started = False
        t_first: float | None = None
        t0 = time.perf_counter()
        try:
            async for c in chunks:
                if isinstance(c, Started):
                    started = True
                    await self.send("conversation.item.added", previous_item_id=self.previous_item_id, item={
                        "id": out_id, "object": "realtime.item", "type": "message", "role": "assistant",
                        "status": "in_progress", "content": []})
                elif isinstance(c, TextDelta) and c.text:
                    t_first = t_first or time.perf_counter()
                    texts.append(c.text)
                    await self.send("response.output_text.delta", response_id=response_id, item_id=out_id,
                                    output_index=0, content_index=0, delta=c.text)
                elif isinstance(c, Finished):
                    usage = c.usage
                    if c.finish_reason == "length":
                        status = "incomplete"
        except asyncio.CancelledError:
            status = "cancelled"
        except APIError as e:
            status, error = "failed", e
        except Exception as e:  # noqa: BLE001 - a bug must end the response, not the session
            log.exception("realtime response failed")
            status, error = "failed", APIError(f"internal error: {type(e).__name__}")
        finally:
            await chunks.aclose()
        if error is not None:
            await self.error(error.message, error.code, type_=error.type, param=error.param)
        text = "".join(texts)
        output = []
        if started:
            await self.send("response.output_text.done", response_id=response_id, item_id=out_id, output_index=0,
                            content_index=0, text=text)
            output = [{"id": out_id, "object": "realtime.item", "type": "message", "role": "assistant",
                       "status": "completed" if status == "completed" else "incomplete",
                       "content": [{"type": "output_text", "text": text}]}]
            self.previous_item_id = out_id
        body: dict[str, Any] = {"id": response_id, "object": "realtime.response", "status": status, "output": output,
                                "metadata": {"ttft_ms": round((t_first - t0) * 1000, 1) if t_first else None}}
        if usage is not None:
            audio = usage.prompt_tokens_details.audio_tokens
            body["usage"] = RealtimeUsage(
                input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens, total_tokens=usage.total_tokens,
                input_token_details={"audio_tokens": audio, "text_tokens": usage.prompt_tokens - audio},
                output_token_details={"text_tokens": usage.completion_tokens, "audio_tokens": 0}).model_dump()
        await self.send("response.done", response=body)

    # ---- prefill while the user speaks ---------------------------------------------------------

    def _maybe_prefill(self) -> None:
        interval = self.settings.realtime_prefill_interval_ms
        if interval <= 0 or (self._warm is not None and not self._warm.done()):
            return
        if self._vad is not None and not self._vad.speaking:
            return
        step = int(interval * self.rate / 1000) * 2
        if len(self.buffer) - self._warmed_bytes < step or len(self.buffer) < step:
            return
        self._warmed_bytes = len(self.buffer)
        job = self._job(pcm16_wav(bytes(self.buffer), self.rate), 1, self.session.instructions, stream=False,
                        reuse=self._warm_vectors)
        self._warm = asyncio.create_task(self._prefill(job))

    async def _prefill(self, job: ChatJob) -> None:
        try:
            self._warm_vectors = await self.service.prefill(job, self._context())
        except APIError as e:  # e.g. the adapter is gone: the real response will say so
            log.debug("prefill skipped", extra={"reason": e.message})


class _EventError(APIError):
    """A client event that cannot be applied (reported as an ``error`` event, the session goes on)."""

    status_code = 400
    type = "invalid_request_error"

    def __init__(self, message: str, code: str, param: str | None) -> None:
        super().__init__(message, code=code, param=param)
