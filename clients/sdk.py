"""A small Python SDK for AuRA serve, sync and async, over HTTP only.

    from clients import AuraClient
    with AuraClient("http://127.0.0.1:8000", api_key=...) as client:
        for delta in client.chat_stream("question.wav", adapter="support"):
            print(delta, end="", flush=True)

It speaks the multipart form of ``/v1/audio/chat`` (no base64 overhead) and parses the SSE stream
strictly; server errors come back as :class:`AuraError` with the server's message and code.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

Audio = str | Path | bytes


class AuraError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, type: str | None = None) -> None:
        super().__init__(f"{status} {code or ''}: {message}".strip())
        self.status = status
        self.message = message
        self.code = code
        self.type = type


@dataclass
class ChatResult:
    text: str
    finish_reason: str | None
    usage: dict[str, Any]
    model: str
    id: str
    token_ids: list[int] | None = None
    raw: dict[str, Any] = field(default_factory=dict)


def _audio_bytes(audio: Audio) -> tuple[str, bytes]:
    if isinstance(audio, bytes):
        return "audio", audio
    path = Path(audio)
    return path.name, path.read_bytes()


def _form(prompt: str | None, adapter: str | None, stream: bool, options: dict[str, Any]) -> dict[str, str]:
    data = {"stream": "true" if stream else "false"}
    if prompt:
        data["prompt"] = prompt
    if adapter:
        data["adapter"] = adapter
    for k, v in options.items():
        if v is None:
            continue
        data[k] = ("true" if v else "false") if isinstance(v, bool) else str(v)
    return data


def _raise_for(response: httpx.Response, body: bytes | None = None) -> None:
    if response.status_code < 400:
        return
    try:
        err = json.loads(body if body is not None else response.content)["error"]
        raise AuraError(response.status_code, err.get("message", ""), err.get("code"), err.get("type"))
    except (ValueError, KeyError, TypeError):
        raise AuraError(response.status_code, (body or response.content or b"").decode(errors="replace")) from None


SSE_DONE = "data: [DONE]"


def parse_event(line: str) -> dict[str, Any] | None:
    """One SSE line -> a chunk dict; None for keep-alives and [DONE] (``line == SSE_DONE``).
    An error event raises :class:`AuraError`. The one SSE reader (the SDK and the benchmarks)."""
    if not line.startswith("data: "):
        return None
    payload = line[6:]
    if payload == "[DONE]":
        return None
    obj = json.loads(payload)
    if "error" in obj:
        err = obj["error"]
        raise AuraError(500, err.get("message", ""), err.get("code"), err.get("type"))
    return obj


def _result(body: dict[str, Any]) -> ChatResult:
    choice = body["choices"][0]
    return ChatResult(text=choice["message"]["content"], finish_reason=choice.get("finish_reason"),
                      usage=body.get("usage") or {}, model=body.get("model", ""), id=body.get("id", ""),
                      token_ids=choice.get("token_ids"), raw=body)


class AuraClient:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", *, api_key: str | None = None,
                 timeout: float = 300.0, transport: httpx.BaseTransport | None = None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout, transport=transport)

    def __enter__(self) -> AuraClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def chat(self, audio: Audio, prompt: str | None = None, *, adapter: str | None = None, **options: Any) -> ChatResult:
        name, data = _audio_bytes(audio)
        r = self._http.post("/v1/audio/chat", files={"file": (name, data)}, data=_form(prompt, adapter, False, options))
        _raise_for(r)
        return _result(r.json())

    def chat_stream(self, audio: Audio, prompt: str | None = None, *, adapter: str | None = None,
                    **options: Any) -> Iterator[str]:
        """Yield text deltas as they arrive."""
        for chunk in self.chat_chunks(audio, prompt, adapter=adapter, **options):
            for choice in chunk.get("choices", []):
                if choice["delta"].get("content"):
                    yield choice["delta"]["content"]

    def chat_chunks(self, audio: Audio, prompt: str | None = None, *, adapter: str | None = None,
                    **options: Any) -> Iterator[dict[str, Any]]:
        """Yield every ``chat.completion.chunk`` (including the final usage chunk)."""
        name, data = _audio_bytes(audio)
        with self._http.stream("POST", "/v1/audio/chat", files={"file": (name, data)},
                               data=_form(prompt, adapter, True, options)) as r:
            if r.status_code >= 400:
                _raise_for(r, r.read())
            for line in r.iter_lines():
                chunk = parse_event(line)
                if chunk is not None:
                    yield chunk

    def models(self) -> list[dict[str, Any]]:
        r = self._http.get("/v1/models")
        _raise_for(r)
        return r.json()["data"]


class AsyncAuraClient:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", *, api_key: str | None = None,
                 timeout: float = 300.0, transport: httpx.AsyncBaseTransport | None = None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout, transport=transport)

    async def __aenter__(self) -> AsyncAuraClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def chat(self, audio: Audio, prompt: str | None = None, *, adapter: str | None = None,
                   **options: Any) -> ChatResult:
        name, data = _audio_bytes(audio)
        r = await self._http.post("/v1/audio/chat", files={"file": (name, data)},
                                  data=_form(prompt, adapter, False, options))
        _raise_for(r)
        return _result(r.json())

    async def chat_stream(self, audio: Audio, prompt: str | None = None, *, adapter: str | None = None,
                          **options: Any) -> AsyncIterator[str]:
        name, data = _audio_bytes(audio)
        async with self._http.stream("POST", "/v1/audio/chat", files={"file": (name, data)},
                                     data=_form(prompt, adapter, True, options)) as r:
            if r.status_code >= 400:
                _raise_for(r, await r.aread())
            async for line in r.aiter_lines():
                chunk = parse_event(line)
                if chunk is None:
                    continue
                for choice in chunk.get("choices", []):
                    if choice["delta"].get("content"):
                        yield choice["delta"]["content"]

    async def models(self) -> list[dict[str, Any]]:
        r = await self._http.get("/v1/models")
        _raise_for(r)
        return r.json()["data"]
