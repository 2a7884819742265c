"""GET /v1/realtime: OpenAI Realtime events over a real WebSocket to the real server.

Audio is a real espeak-ng question streamed as PCM16 in 100 ms appends, in real time; every
answer is compared token for token (as text, greedy) with the one-shot POST of the same clip.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from websockets.sync.client import ClientConnection, connect

from adapters.audio import decode_audio
from server.realtime import pcm16_wav

RATE = 24000
CHUNK = RATE // 10  # 100 ms of samples


def pcm_of(wav: Path, rate: int = RATE, silence_s: float = 0.0) -> bytes:
    samples = decode_audio(wav.read_bytes(), sample_rate=rate).samples
    samples = np.concatenate([samples, np.zeros(int(silence_s * rate), dtype=np.float32)])
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


def one_shot(url: str, pcm: bytes, adapter: str, max_tokens: int, rate: int = RATE) -> str:
    r = httpx.post(f"{url}/v1/audio/chat", files={"file": ("q.wav", pcm16_wav(pcm, rate), "audio/wav")},
                   data={"adapter": adapter, "max_tokens": str(max_tokens)}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def ws_url(url: str) -> str:
    return url.replace("http://", "ws://") + "/v1/realtime"


def send(ws: ClientConnection, type_: str, **fields) -> None:
    ws.send(json.dumps({"type": type_, **fields}))


def events_until(ws: ClientConnection, last: str, timeout: float = 120) -> list[dict]:
    out: list[dict] = []
    deadline = time.monotonic() + timeout
    while True:
        event = json.loads(ws.recv(timeout=max(0.1, deadline - time.monotonic())))
        out.append(event)
        if event["type"] == last:
            return out


def stream_pcm(ws: ClientConnection, pcm: bytes, realtime: bool = True) -> None:
    step = CHUNK * 2
    for i in range(0, len(pcm), step):
        send(ws, "input_audio_buffer.append", audio=base64.b64encode(pcm[i:i + step]).decode())
        if realtime:
            time.sleep(0.1)


def open_session(url: str, **session) -> ClientConnection:
    ws = connect(ws_url(url), open_timeout=30)
    created = json.loads(ws.recv(timeout=30))
    assert created["type"] == "session.created" and created["session"]["id"]
    cfg = {"audio": {"input": {"format": {"type": "audio/pcm", "rate": RATE}, "turn_detection": None}}, **session}
    send(ws, "session.update", session=cfg)
    updated = json.loads(ws.recv(timeout=30))
    assert updated["type"] == "session.updated", updated
    return ws


def test_a_scripted_session_answers_like_the_one_shot_post(server, speech):
    pcm = pcm_of(speech["capital"])
    expected = one_shot(server.url, pcm, "alpha", 8)
    with open_session(server.url, model="alpha", max_output_tokens=8) as ws:
        stream_pcm(ws, pcm)
        send(ws, "input_audio_buffer.commit")
        committed = events_until(ws, "conversation.item.added")
        assert [e["type"] for e in committed] == ["input_audio_buffer.committed", "conversation.item.added"]
        assert committed[1]["item"]["role"] == "user" and committed[1]["item"]["id"] == committed[0]["item_id"]
        send(ws, "response.create")
        events = events_until(ws, "response.done")
    types = [e["type"] for e in events]
    assert types[:2] == ["response.created", "conversation.item.added"]
    assert types[-2:] == ["response.output_text.done", "response.done"]
    assert set(types[2:-2]) == {"response.output_text.delta"}
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    done = events[-1]["response"]
    assert deltas == events[-2]["text"] == done["output"][0]["content"][0]["text"] == expected
    assert done["status"] == "incomplete"  # stopped by max_output_tokens, as OpenAI reports it
    assert done["usage"]["output_tokens"] == 8 and done["usage"]["input_token_details"]["audio_tokens"] > 0
    assert len({e["event_id"] for e in events}) == len(events)


def test_server_vad_detects_the_end_of_speech_and_answers_by_itself(server, speech):
    pcm = pcm_of(speech["sky"], silence_s=1.0)
    with open_session(server.url, model="beta", max_output_tokens=6,
                      audio={"input": {"turn_detection": {"type": "server_vad", "silence_duration_ms": 500}}}) as ws:
        stream_pcm(ws, pcm, realtime=False)
        events = events_until(ws, "response.done")
    types = [e["type"] for e in events]
    assert types.index("input_audio_buffer.speech_started") < types.index("input_audio_buffer.speech_stopped") \
        < types.index("input_audio_buffer.committed") < types.index("response.created")
    stopped = next(e for e in events if e["type"] == "input_audio_buffer.speech_stopped")
    speech_ms = len(pcm_of(speech["sky"])) * 1000 // (2 * RATE)
    assert speech_ms - 200 < stopped["audio_end_ms"] < speech_ms + 800
    assert events[-1]["response"]["status"] in ("completed", "incomplete")


def test_cancel_stops_the_response_and_the_session_goes_on(server, speech):
    pcm = pcm_of(speech["water"])
    with open_session(server.url, model="alpha") as ws:
        stream_pcm(ws, pcm, realtime=False)
        send(ws, "input_audio_buffer.commit")
        events_until(ws, "conversation.item.added")
        send(ws, "response.create", response={"max_output_tokens": 600})
        events_until(ws, "response.output_text.delta")
        send(ws, "response.cancel")
        done = events_until(ws, "response.done")[-1]
        assert done["response"]["status"] == "cancelled"
        assert done["response"]["output"][0]["content"][0]["text"]
        # the engine request was aborted: nothing is left running
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            text = httpx.get(f"{server.url}/metrics").text
            if "aura_engine_requests_unfinished 0.0" in text:
                break
            time.sleep(0.2)
        assert "aura_engine_requests_unfinished 0.0" in text
        stream_pcm(ws, pcm, realtime=False)
        send(ws, "input_audio_buffer.commit")
        send(ws, "response.create", response={"max_output_tokens": 4})
        assert events_until(ws, "response.done")[-1]["response"]["status"] == "incomplete"


@pytest.mark.parametrize("raw, code", [
    ("{not json", "invalid_json"),
    (json.dumps({"type": "conversation.item.retrieve"}), "invalid_event"),
    (json.dumps({"type": "input_audio_buffer.append", "audio": "***"}), "invalid_audio"),
    (json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"abc").decode()}), "invalid_audio"),
    (json.dumps({"type": "input_audio_buffer.commit"}), "input_audio_buffer_commit_empty"),
    (json.dumps({"type": "response.create"}), "no_input_audio"),
    (json.dumps({"type": "response.cancel"}), "response_cancel_not_active"),
    (json.dumps({"type": "session.update", "session": {"audio": {"input": {"format": {"rate": 8000}}}}}),
     "invalid_value"),
    (json.dumps({"type": "session.update", "session": {"model": "nope"}}), "adapter_not_found"),
])
def test_bad_events_get_error_events_and_the_socket_keeps_working(server, speech, raw, code):
    with open_session(server.url, model="alpha", max_output_tokens=2) as ws:
        ws.send(raw)
        err = json.loads(ws.recv(timeout=30))
        assert err["type"] == "error" and err["error"]["message"]
        assert err["error"]["code"] == code, err
        stream_pcm(ws, pcm_of(speech["sky"]), realtime=False)
        send(ws, "input_audio_buffer.commit")
        send(ws, "response.create")
        assert events_until(ws, "response.done")[-1]["response"]["status"] in ("completed", "incomplete")


def test_two_sessions_with_different_adapters_at_once(server, speech):
    pcm = pcm_of(speech["spider"])
    expected = {a: one_shot(server.url, pcm, a, 8) for a in ("alpha", "beta")}
    assert expected["alpha"] != expected["beta"]
    got: dict[str, str] = {}

    def run(adapter: str) -> None:
        with open_session(server.url, model=adapter, max_output_tokens=8) as ws:
            stream_pcm(ws, pcm)
            send(ws, "input_audio_buffer.commit")
            send(ws, "response.create")
            got[adapter] = events_until(ws, "response.done")[-1]["response"]["output"][0]["content"][0]["text"]

    threads = [threading.Thread(target=run, args=(a,)) for a in expected]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert got == expected


def test_the_openai_sdk_realtime_client_works(server, speech):
    pcm = pcm_of(speech["capital"])
    expected = one_shot(server.url, pcm, "beta", 6)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused",
                           websocket_base_url=ws_url(server.url).removesuffix("/realtime"))
    with client.realtime.connect(model="beta") as conn:
        assert conn.recv().type == "session.created"
        conn.session.update(session={"type": "realtime", "output_modalities": ["text"], "max_output_tokens": 6,
                                     "audio": {"input": {"format": {"type": "audio/pcm", "rate": RATE},
                                                         "turn_detection": None}}})
        assert conn.recv().type == "session.updated"
        for i in range(0, len(pcm), CHUNK * 2):
            conn.input_audio_buffer.append(audio=base64.b64encode(pcm[i:i + CHUNK * 2]).decode())
        conn.input_audio_buffer.commit()
        conn.response.create()
        text, done = [], None
        for event in conn:
            if event.type == "response.output_text.delta":
                text.append(event.delta)
            elif event.type == "response.done":
                done = event
                break
    assert "".join(text) == expected
    assert done is not None and done.response.usage.output_tokens == 6


def _prefix_hits(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:prefix_cache_hits_total"))


def test_audio_is_prefilled_while_the_user_speaks(server, speech):
    """At commit the engine finds the spoken audio's prompt blocks in its prefix cache: the
    warm-up requests sent while streaming computed them; the answer is unchanged."""
    # A gain no other test uses: no earlier request can have cached these audio vectors.
    samples = np.frombuffer(pcm_of(speech["water"]), dtype="<i2")
    pcm = (samples.astype(np.float32) * 0.8).astype("<i2").tobytes()
    with open_session(server.url, model="beta", max_output_tokens=6) as ws:
        stream_pcm(ws, pcm)  # real time: the session warms the cache every 400 ms of speech
        time.sleep(1.0)  # let the last warm-up finish
        before = _prefix_hits(server.url)
        send(ws, "input_audio_buffer.commit")
        send(ws, "response.create")
        done = events_until(ws, "response.done")[-1]["response"]
    hits = _prefix_hits(server.url) - before
    audio_tokens = done["usage"]["input_token_details"]["audio_tokens"]
    assert done["output"][0]["content"][0]["text"] == one_shot(server.url, pcm, "beta", 6)
    # Most of the audio positions (all but the tail block) came from the cache.
    assert hits >= audio_tokens * 0.5, (hits, audio_tokens)
