"""Every request and response body, in one place (OpenAI chat shapes plus AuRA's extras)."""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field


# ---- requests ---------------------------------------------------------------------------------

class InputAudio(BaseModel):
    data: str = Field(..., description="Base64-encoded audio file bytes (any container FFmpeg reads).")
    format: str | None = Field(None, description="wav, mp3, flac, ogg, webm, m4a... (a hint; the content decides).")


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class AudioContentPart(BaseModel):
    type: Literal["input_audio"]
    input_audio: InputAudio


ContentPart = Annotated[Union[TextPart, AudioContentPart], Field(discriminator="type")]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]


class StreamOptions(BaseModel):
    include_usage: bool = True


class ChatCompletionRequest(BaseModel):
    """OpenAI's chat request; ``model`` names the adapter (or is omitted for the default)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[ChatMessage] = Field(..., min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 (the default) is greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1, description="Only one choice per request is supported.")
    return_token_ids: bool = Field(False, description="AuRA extension: include generated token ids (as vLLM does).")
    timeout: float | None = Field(None, gt=0, description="AuRA extension: seconds this request may take "
                                  "(capped by the server's request_timeout_s); past it the request is aborted (504).")


# ---- responses --------------------------------------------------------------------------------

class PromptTokensDetails(BaseModel):
    audio_tokens: int = 0
    cached_tokens: int | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    audio_seconds: float = 0.0
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    token_ids: list[int] | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None
    token_ids: list[int] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "aura-serve"
    root: str | None = None
    parent: str | None = None
    kind: Literal["base", "adapter"] = "adapter"
    trained: bool | None = None
    version: int | None = None
    default: bool = False
    description: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    code: str
    param: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route, so /openapi.json documents every error shape it can answer."""
    return {code: {"model": ErrorResponse} for code in codes}


# ---- adapter management (/v1/adapters) ----------------------------------------------------------

ADAPTER_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
SHA256_HEX = r"^[0-9a-fA-F]{64}$"


class AdapterLoadRequest(BaseModel):
    """Load ``source`` as adapter ``name``; if the name is loaded, this installs a new version."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., pattern=ADAPTER_NAME,
                      description="Adapter name clients put in `model` (letters, digits, . _ -).")
    source: str = Field(..., min_length=1, description="Path, file://, s3://bucket/prefix/ or https://…/adapter.tar.gz.")
    pin: bool = Field(False, description="Keep this adapter in an engine LoRA slot (never LRU-evicted).")
    sha256: str | None = Field(None, pattern=SHA256_HEX,
                               description="Expected sha256 of the archive (or of the folder digest).")


class AdapterVersionInfo(BaseModel):
    version: int
    lora_id: int
    status: Literal["serving", "draining", "unloaded"]
    active_requests: int


class AdapterInfo(BaseModel):
    object: Literal["adapter"] = "adapter"
    name: str
    version: int
    lora_id: int
    status: Literal["serving", "draining", "unloaded"]
    rank: int = Field(description="LoRA rank; the largest, when the adapter gives some blocks another (rank_pattern). "
                      "What --max-lora-rank must cover.")
    alpha: float
    target_modules: list[str]
    base_model: str
    base_model_fingerprint: str
    trained: bool
    pinned: bool
    default: bool
    source: str
    loaded_at: int
    resident: Literal["engine", "disk", "unknown"] = Field(
        ..., description="engine: in vLLM's host LoRA cache (and a slot when in use); disk: evicted by the "
                         "LRU, reloaded from the local adapter cache on next use.")
    active_requests: int
    draining: list[AdapterVersionInfo] = Field(default_factory=list,
                                               description="Older versions still finishing requests.")
    previous_version: int | None = None


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterInfo]
    engine_lora_ids: list[int] | None = Field(
        None, description="Admins only: every LoRA id the engine holds, to audit that unloads free memory.")


class AdapterDeleted(BaseModel):
    object: Literal["adapter.deleted"] = "adapter.deleted"
    name: str
    version: int
    deleted: bool = True
    draining_requests: int = 0


# ---- audio transcriptions (/v1/audio/transcriptions, OpenAI's shape) ---------------------------

TranscriptionFormat = Literal["json", "text", "verbose_json", "srt", "vtt", "diarized_json"]


class TranscriptionForm(BaseModel):
    """The multipart fields of OpenAI's transcription request (``file`` is the audio upload)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="The adapter (default: the caller's/the server's default).")
    language: str | None = Field(None, pattern=r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})?$",
                                 description="ISO-639 code of the speech; reported back, not used to steer.")
    prompt: str | None = Field(None, description="Accepted for compatibility; AuRA adapters transcribe with the "
                               "prompt they were trained with, so it does not change the output.")
    temperature: float = Field(0.0, ge=0.0, le=1.0)
    response_format: TranscriptionFormat = "json"
    stream: bool = False
    timestamp_granularities: list[str] = Field(default_factory=list, alias="timestamp_granularities[]")
    include: list[str] = Field(default_factory=list, alias="include[]")
    chunking_strategy: str | None = None
    max_tokens: int | None = Field(None, ge=1, description="AuRA extension (as vLLM's max_completion_tokens): "
                                   "cap on transcript tokens; default: the server's max_tokens_limit.")


class TranscriptionInputDetails(BaseModel):
    audio_tokens: int
    text_tokens: int


class TranscriptionUsage(BaseModel):
    """OpenAI's token usage of a transcription, plus the audio duration (an AuRA extension)."""

    type: Literal["tokens"] = "tokens"
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_token_details: TranscriptionInputDetails
    seconds: float


class Transcription(BaseModel):
    text: str
    usage: TranscriptionUsage


class TranscriptionVerbose(BaseModel):
    task: Literal["transcribe"] = "transcribe"
    language: str
    duration: float
    text: str
    usage: TranscriptionUsage


class TranscriptTextDelta(BaseModel):
    type: Literal["transcript.text.delta"] = "transcript.text.delta"
    delta: str


class TranscriptTextDone(BaseModel):
    type: Literal["transcript.text.done"] = "transcript.text.done"
    text: str
    usage: TranscriptionUsage


# ---- realtime (GET /v1/realtime over WebSocket, OpenAI Realtime's GA event names) --------------

class RealtimeAudioFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["audio/pcm", "pcm16"] = "audio/pcm"
    rate: Literal[16000, 24000] = 24000


class RealtimeTurnDetection(BaseModel):
    """Server-side voice activity detection: speech start/stop from the energy of the audio."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["server_vad"] = "server_vad"
    threshold: float = Field(0.5, ge=0.0, le=1.0, description="Higher: louder audio needed to count as speech.")
    prefix_padding_ms: int = Field(300, ge=0, le=2000)
    silence_duration_ms: int = Field(500, ge=100, le=5000)
    create_response: bool = True


class RealtimeAudioInput(BaseModel):
    model_config = ConfigDict(extra="ignore")

    format: RealtimeAudioFormat = Field(default_factory=RealtimeAudioFormat)
    turn_detection: RealtimeTurnDetection | None = Field(default_factory=RealtimeTurnDetection)


class RealtimeAudio(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input: RealtimeAudioInput = Field(default_factory=RealtimeAudioInput)


class RealtimeSession(BaseModel):
    """The session as the server holds it (and echoes in session.created / session.updated)."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["realtime"] = "realtime"
    object: Literal["realtime.session"] = "realtime.session"
    id: str = ""
    model: str | None = Field(None, description="The adapter (default: the caller's / the server's default).")
    instructions: str | None = Field(None, max_length=32768, description="A system message before the audio.")
    output_modalities: list[Literal["text"]] = Field(default_factory=lambda: ["text"])
    audio: RealtimeAudio = Field(default_factory=RealtimeAudio)
    max_output_tokens: int | Literal["inf"] = "inf"


class SessionUpdate(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["session.update"]
    event_id: str | None = None
    session: dict[str, Any]


class InputAudioBufferAppend(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["input_audio_buffer.append"]
    event_id: str | None = None
    audio: str = Field(..., description="Base64 PCM16 little-endian mono at the session's input rate.")


class InputAudioBufferCommit(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["input_audio_buffer.commit"]
    event_id: str | None = None


class InputAudioBufferClear(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["input_audio_buffer.clear"]
    event_id: str | None = None


class ResponseCreateOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    instructions: str | None = Field(None, max_length=32768)
    max_output_tokens: int | Literal["inf"] | None = None


class ResponseCreate(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["response.create"]
    event_id: str | None = None
    response: ResponseCreateOptions = Field(default_factory=ResponseCreateOptions)


class ResponseCancel(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["response.cancel"]
    event_id: str | None = None
    response_id: str | None = None


RealtimeClientEvent = Annotated[
    Union[SessionUpdate, InputAudioBufferAppend, InputAudioBufferCommit, InputAudioBufferClear, ResponseCreate,
          ResponseCancel],
    Field(discriminator="type")]
REALTIME_CLIENT_EVENTS = ("session.update", "input_audio_buffer.append", "input_audio_buffer.commit",
                          "input_audio_buffer.clear", "response.create", "response.cancel")


class RealtimeUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_token_details: dict[str, int]
    output_token_details: dict[str, int]
