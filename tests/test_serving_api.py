"""The HTTP contract of /v1/audio/chat and /v1/chat/completions against the real server."""

from __future__ import annotations

import base64
import http.client
import time

import httpx
import openai
import pytest
import soundfile as sf

from sse import parse_sse


def _form(**fields):
    return {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in fields.items()}


def post_audio(url: str, wav, **fields) -> httpx.Response:
    with open(wav, "rb") as f:
        return httpx.post(f"{url}/v1/audio/chat", files={"file": ("q.wav", f, "audio/wav")},
                          data=_form(**fields), timeout=120)


def stream_audio(url: str, wav, **fields):
    with open(wav, "rb") as f, httpx.stream(
        "POST", f"{url}/v1/audio/chat", files={"file": ("q.wav", f, "audio/wav")},
        data=_form(stream=True, **fields), timeout=120,
    ) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return parse_sse(list(r.iter_lines()))


def audio_json(wav, text: str | None = None, **extra) -> dict:
    data = base64.b64encode(open(wav, "rb").read()).decode()
    content: list[dict] = [{"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}]
    if text:
        content.append({"type": "text", "text": text})
    return {"messages": [{"role": "user", "content": content}], **extra}


def test_sse_stream_is_well_formed(server, speech):
    s = stream_audio(server.url, speech["capital"], adapter="alpha", max_tokens=12, return_token_ids=True)
    assert s.done and s.error is None
    first, *rest = s.chunks
    assert first["choices"][0]["delta"]["role"] == "assistant"
    assert len({c["id"] for c in s.chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "alpha" for c in s.chunks)
    content_chunks = [c for c in rest if c["choices"]]
    assert len(content_chunks) >= 2, "tokens must arrive as separate events, not one blob"
    finishes = [c["choices"][0]["finish_reason"] for c in content_chunks]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    usage_chunk = s.chunks[-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] is not None
    usage = usage_chunk["usage"]
    assert usage["completion_tokens"] == len(s.token_ids) == 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    audio_tokens = usage["prompt_tokens_details"]["audio_tokens"]
    assert 0 < audio_tokens < usage["prompt_tokens"]
    info = sf.info(str(speech["capital"]))
    assert usage["audio_seconds"] == pytest.approx(info.frames / info.samplerate, abs=0.05)


def test_stream_and_non_stream_agree(server, speech):
    s = stream_audio(server.url, speech["spider"], adapter="beta", max_tokens=10)
    r = post_audio(server.url, speech["spider"], adapter="beta", max_tokens=10)
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "beta"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == s.text
    assert choice["finish_reason"] == s.finish_reason
    assert body["usage"]["completion_tokens"] == s.usage["completion_tokens"]


def test_json_and_multipart_are_the_same_request(server, speech):
    form = post_audio(server.url, speech["sky"], adapter="alpha", max_tokens=8, prompt="Answer briefly.").json()
    for path in ("/v1/audio/chat", "/v1/chat/completions"):
        body = audio_json(speech["sky"], "Answer briefly.", model="alpha", max_tokens=8)
        r = httpx.post(server.url + path, json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == form["choices"][0]["message"]["content"]
        assert r.json()["usage"]["prompt_tokens"] == form["usage"]["prompt_tokens"]


def test_text_prompt_changes_the_prompt(server, speech):
    bare = post_audio(server.url, speech["sky"], adapter="alpha", max_tokens=4).json()
    with_text = post_audio(server.url, speech["sky"], adapter="alpha", max_tokens=4, prompt="Answer briefly.").json()
    assert with_text["usage"]["prompt_tokens"] > bare["usage"]["prompt_tokens"]


def test_openai_client_round_trip(server, speech):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    body = audio_json(speech["water"])
    done = client.chat.completions.create(model="beta", messages=body["messages"], max_tokens=8, temperature=0)
    assert done.choices[0].message.content
    assert done.usage.completion_tokens == 8
    pieces = []
    for chunk in client.chat.completions.create(model="beta", messages=body["messages"], max_tokens=8,
                                                temperature=0, stream=True, stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    assert "".join(pieces) == done.choices[0].message.content


def test_models_lists_base_and_adapters(server):
    r = httpx.get(f"{server.url}/v1/models")
    assert r.status_code == 200
    cards = {c["id"]: c for c in r.json()["data"]}
    assert {"alpha", "beta"} <= set(cards)
    base = [c for c in cards.values() if c["kind"] == "base"]
    assert len(base) == 1
    assert cards["alpha"]["trained"] is False and "UNTRAINED" in cards["alpha"]["description"]
    assert cards["alpha"]["parent"] == base[0]["id"]
    assert sum(c["default"] for c in cards.values()) == 1


def test_health_and_ready(server):
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    ready = httpx.get(f"{server.url}/ready").json()
    assert ready["status"] == "ready" and ready["default_adapter"] in ("alpha", "beta")


def test_an_idle_keep_alive_connection_outlives_the_clients_idle_timeout(server):
    """The server must not be the side that closes idle connections on a client's usual schedule:
    httpx (and most proxies) keep theirs 5-60 s, and a request sent on a pooled connection just as
    the server closes it fails with a read error (uvicorn's default was 5 s: the soak's ReadErrors)."""
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        for pause in (0.0, 7.0):
            time.sleep(pause)
            conn.request("GET", "/health")
            reply = conn.getresponse()  # RemoteDisconnected if the server closed the idle connection
            assert reply.status == 200 and reply.read() and not reply.will_close
    finally:
        conn.close()


def test_request_id_is_echoed(server, speech):
    r = httpx.post(f"{server.url}/v1/chat/completions", json=audio_json(speech["sky"], max_tokens=2),
                   headers={"X-Request-ID": "trace-123"}, timeout=60)
    assert r.headers["x-request-id"] == "trace-123"
    assert r.json()["id"] == "chatcmpl-trace-123"
    assert httpx.get(f"{server.url}/health").headers["x-request-id"]


@pytest.mark.parametrize(
    "kind, status, code",
    [
        ("unknown_adapter", 404, "adapter_not_found"),
        ("no_file", 422, None),
        ("not_audio", 415, "audio_unsupported"),
        ("bad_json", 422, "invalid_json"),
        ("bad_schema", 422, None),
        ("bad_base64", 400, "invalid_base64"),
        ("max_tokens", 400, "max_tokens_too_large"),
        ("bad_temperature", 422, None),
        ("content_type", 415, "unsupported_content_type"),
    ],
)
def test_bad_requests_get_clear_errors(server, speech, kind, status, code):
    url = f"{server.url}/v1/audio/chat"
    wav = open(speech["capital"], "rb").read()
    if kind == "unknown_adapter":
        r = httpx.post(url, files={"file": ("q.wav", wav)}, data={"adapter": "nope"})
    elif kind == "no_file":
        r = httpx.post(url, files={"prompt": (None, "hi")})
    elif kind == "not_audio":
        r = httpx.post(url, files={"file": ("q.wav", b"this is not audio at all" * 20)})
    elif kind == "bad_json":
        r = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    elif kind == "bad_schema":
        r = httpx.post(url, json={"messages": "hello"})
    elif kind == "bad_base64":
        r = httpx.post(url, json={"messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "!!!not base64!!!", "format": "wav"}}]}]})
    elif kind == "max_tokens":
        r = httpx.post(url, files={"file": ("q.wav", wav)}, data={"max_tokens": "1000000"})
    elif kind == "bad_temperature":
        r = httpx.post(url, files={"file": ("q.wav", wav)}, data={"temperature": "hot"})
    else:
        r = httpx.post(url, content=wav, headers={"content-type": "audio/wav"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    if code:
        assert err["code"] == code
    # the server keeps serving everyone else
    ok = post_audio(server.url, speech["capital"], max_tokens=2)
    assert ok.status_code == 200
