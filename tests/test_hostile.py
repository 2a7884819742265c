"""A hostile tenant against the request path (issue 9's request-path findings), over real HTTP.

Each test is one finding that failed before its fix: 500s that must be 4xx, requests that froze
the event loop, bodies that escaped the size limit, slow uploads that held pipeline slots, a
tenant that filled the engine's whole batch, and a server that lived on without its engine.
Cheap cases use the shared server; the ones that need small limits run on a dedicated one.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import select
import socket
import threading
import time
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest
import soundfile as sf

from launch import start_server, stop_server

GOOD = {"adapter": "alpha", "max_tokens": "6", "return_token_ids": "true"}


def _chat(url: str, raw: bytes) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", content=raw, headers={"content-type": "application/json"},
                      timeout=120)


def _audio_body(wav: bytes, **extra: object) -> dict:
    part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}}
    return {"model": "alpha", "max_tokens": 4, "messages": [{"role": "user", "content": [part]}], **extra}


def _good_tokens(url: str, wav: bytes) -> list[int]:
    r = httpx.post(f"{url}/v1/audio/chat", files={"file": ("q.wav", wav)}, data=GOOD, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


@pytest.fixture(scope="module")
def wav(speech) -> bytes:
    return speech["capital"].read_bytes()


@pytest.fixture(scope="module")
def baseline(server, wav) -> list[int]:
    return _good_tokens(server.url, wav)


class HealthProbe:
    """Polls /health in a thread while something else runs; remembers the slowest answer."""

    def __init__(self, url: str) -> None:
        self.url, self.worst, self._stop = url, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=60) as c:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                c.get(f"{self.url}/health")
                self.worst = max(self.worst, time.perf_counter() - t0)
                time.sleep(0.02)

    def __enter__(self) -> "HealthProbe":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# ---- 9: the listed 500s become 4xx -----------------------------------------------------------------

def test_json_nested_100000_deep_is_a_400(server, baseline, wav):
    r = _chat(server.url, b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "json_too_deep"
    assert _good_tokens(server.url, wav) == baseline


@pytest.mark.parametrize("where", ["prompt", "model", "stop"])
def test_lone_surrogates_are_a_400(server, baseline, wav, where):
    body = _audio_body(wav)
    if where == "prompt":
        body["messages"][0]["content"].append({"type": "text", "text": "SURROGATE"})
    elif where == "model":
        body["model"] = "alphaSURROGATE"
    else:
        body["stop"] = ["SURROGATE"]
    raw = json.dumps(body).replace("SURROGATE", "\\ud800").encode()
    r = _chat(server.url, raw)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_text"
    assert httpx.get(f"{server.url}/metrics", timeout=10).status_code == 200
    assert _good_tokens(server.url, wav) == baseline


def test_seed_beyond_64_bits_is_a_400(server, baseline, wav):
    r = _chat(server.url, json.dumps(_audio_body(wav, seed=2**64)).encode())
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_seed"
    ok = _chat(server.url, json.dumps(_audio_body(wav, seed=2**63)).encode())
    assert ok.status_code == 200, ok.text
    assert _good_tokens(server.url, wav) == baseline


def test_empty_stop_string_with_stream_is_a_400_not_a_dropped_stream(server, baseline, wav):
    r = _chat(server.url, json.dumps(_audio_body(wav, stop=[""], stream=True)).encode())
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "empty_stop_string"
    assert _good_tokens(server.url, wav) == baseline


def test_a_wav_with_8_ms_of_samples_is_a_400(server, baseline, wav):
    buf = io.BytesIO()
    sf.write(buf, np.random.default_rng(0).standard_normal(48000).astype(np.float32) * 0.1, 16000,
             format="WAV", subtype="PCM_16")
    r = httpx.post(f"{server.url}/v1/audio/chat", files={"file": ("q.wav", buf.getvalue()[:300])}, data=GOOD,
                   timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "audio_too_short"
    assert _good_tokens(server.url, wav) == baseline


# ---- 3: no request freezes the server ----------------------------------------------------------------

def test_a_24_mb_prompt_field_is_refused_without_stalling_health(server, baseline, wav):
    with HealthProbe(server.url) as probe:
        t0 = time.perf_counter()
        r = httpx.post(f"{server.url}/v1/audio/chat", files={"file": ("q.wav", wav)},
                       data={**GOOD, "prompt": "word " * (24 * 1024 * 1024 // 5)}, timeout=120)
        took = time.perf_counter() - t0
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_multipart", r.text[:300]
    assert took < 5, f"refusing took {took:.1f} s"
    assert probe.worst < 1.0, f"/health took {probe.worst:.2f} s during the request"
    assert _good_tokens(server.url, wav) == baseline


def test_a_long_json_prompt_gets_413_and_health_stays_fast(server, baseline, wav):
    body = _audio_body(wav)
    body["messages"][0]["content"].append({"type": "text", "text": "word " * 400_000})
    with HealthProbe(server.url) as probe:
        r = _chat(server.url, json.dumps(body).encode())
    assert r.status_code == 413 and r.json()["error"]["code"] == "prompt_too_long", r.text[:300]
    assert probe.worst < 1.0, f"/health took {probe.worst:.2f} s during the request"
    assert _good_tokens(server.url, wav) == baseline


def test_a_million_stop_strings_are_refused_without_stalling_health(server, baseline, wav):
    raw = json.dumps(_audio_body(wav, stop=[f"s{i}" for i in range(1_000_000)])).encode()
    with HealthProbe(server.url) as probe:
        r = _chat(server.url, raw)
    assert r.status_code == 400 and r.json()["error"]["code"] == "json_too_many_nodes", r.text[:300]
    assert probe.worst < 1.0, f"/health took {probe.worst:.2f} s during the request"
    few = _chat(server.url, json.dumps(_audio_body(wav, stop=[f"s{i}" for i in range(17)])).encode())
    assert few.status_code == 400 and few.json()["error"]["code"] == "too_many_stop_strings", few.text
    long = _chat(server.url, json.dumps(_audio_body(wav, stop=["x" * 257])).encode())
    assert long.status_code == 400 and long.json()["error"]["code"] == "stop_string_too_long", long.text
    assert _good_tokens(server.url, wav) == baseline


# ---- 5: the body limit holds while the body streams in, whatever the headers say ---------------------

def _chunked_upload(url: str, parts: list[tuple[bytes, int]], boundary: str = "xyzzy") -> tuple[int | None, int]:
    """POST a multipart body with Transfer-Encoding: chunked (no Content-Length). ``parts``: (part
    header, bytes of payload) streamed in 1 MiB chunks. Returns (HTTP status or None when the server
    cut the connection, bytes sent before the server answered or cut it)."""
    u = urlparse(url)
    sent = 0
    with socket.create_connection((u.hostname, u.port), timeout=30) as s:
        s.sendall((f"POST /v1/audio/chat HTTP/1.1\r\nHost: {u.hostname}\r\nTransfer-Encoding: chunked\r\n"
                   f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n").encode())

        def chunk(data: bytes) -> None:
            s.sendall(f"{len(data):x}\r\n".encode() + data + b"\r\n")

        block = b"a" * (1 << 20)
        try:
            for head, size in parts:
                chunk(f"--{boundary}\r\n".encode() + head + b"\r\n\r\n")
                left = size
                while left > 0:
                    if select.select([s], [], [], 0)[0]:
                        raise StopIteration  # the server answered before the body was done
                    piece = block[:min(left, len(block))]
                    chunk(piece)
                    sent += len(piece)
                    left -= len(piece)
                chunk(b"\r\n")
            chunk(f"--{boundary}--\r\n".encode())
            s.sendall(b"0\r\n\r\n")
        except (StopIteration, BrokenPipeError, ConnectionResetError):
            pass
        try:
            head = s.recv(65536)
        except (ConnectionResetError, TimeoutError):
            return None, sent
    m = re.match(rb"HTTP/1.1 (\d+)", head)
    return (int(m.group(1)) if m else None), sent


def test_chunked_form_fields_cannot_pass_the_body_limit(server, baseline, wav):
    field = b'Content-Disposition: form-data; name="prompt"'
    status, sent = _chunked_upload(server.url, [(field, 30 << 20), (field, 30 << 20)])
    assert status in (413, None), status  # 413, or the connection cut while we were still sending
    assert sent < 60 << 20, "the server read both 30 MiB fields (the limit is ~34 MiB)"
    assert _good_tokens(server.url, wav) == baseline


def test_a_huge_chunked_file_part_is_cut_off_near_the_limit(server, baseline, wav):
    file_part = b'Content-Disposition: form-data; name="file"; filename="q.wav"\r\nContent-Type: audio/wav'
    status, sent = _chunked_upload(server.url, [(file_part, 200 << 20)])
    assert status in (413, None), status  # 413, or the connection cut while we were still sending
    assert sent < 100 << 20, f"the server read {sent >> 20} MiB before refusing (limit ~34 MiB)"
    assert _good_tokens(server.url, wav) == baseline


# ---- a dedicated server with small limits ---------------------------------------------------------------

@pytest.fixture(scope="module")
def small(tiny, tmp_path_factory):
    home = tmp_path_factory.mktemp("hostile")
    args = ["--model", str(tiny.llm), "--dtype", "float32", "--max-model-len", "1024", "--max-num-seqs", "4",
            "--max-concurrent-requests", "8", "--tenant-header", "X-Tenant",
            "--adapter", f"alpha={tiny.adapters['alpha']}"]
    srv = start_server(args, home, home / "server.log", env={"AURA_BODY_READ_TIMEOUT_S": "2"})
    yield srv
    stop_server(srv)


def _gauge(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    assert m, name
    return float(m.group(1))


async def test_slow_uploads_hold_no_slot_and_time_out(small, wav):
    """Six uploads trickling 1 byte / 0.5 s: no pipeline slot is held while they trickle, a normal
    request is served at once, and each slow one gets 408 after the 2 s body-read deadline."""

    async def trickle() -> tuple[float, bytes]:
        """(seconds until the server answered, the answer's first bytes), sending 1 byte / 0.5 s."""
        u = urlparse(small.url)
        reader, writer = await asyncio.open_connection(u.hostname, u.port)
        writer.write((f"POST /v1/audio/chat HTTP/1.1\r\nHost: {u.hostname}\r\nX-Tenant: slow\r\n"
                      "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n"
                      '--b\r\nContent-Disposition: form-data; name="file"; filename="q.wav"\r\n\r\n').encode())

        async def drip() -> None:
            for _ in range(60):
                await asyncio.sleep(0.5)
                writer.write(b"R")
                await writer.drain()

        t0 = time.monotonic()
        dripping = asyncio.create_task(drip())
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 25)
            length = re.search(rb"(?i)content-length: *(\d+)", head)
            body = await asyncio.wait_for(reader.readexactly(int(length.group(1))), 5) if length else b""
            answer = head + body  # the body may come in a later packet than the head
        finally:
            dripping.cancel()
            await asyncio.gather(dripping, return_exceptions=True)
            writer.close()
        return time.monotonic() - t0, answer

    slow = [asyncio.create_task(trickle()) for _ in range(6)]
    await asyncio.sleep(1.0)
    assert _gauge(small.url, "aura_requests_in_flight") == 0, "a slow upload holds a pipeline slot"
    async with httpx.AsyncClient(base_url=small.url, timeout=30) as c:
        t1 = time.monotonic()
        r = await c.post("/v1/audio/chat", files={"file": ("q.wav", wav)}, data=GOOD)
        assert r.status_code == 200 and time.monotonic() - t1 < 5, r.text
    outcomes = await asyncio.gather(*slow)
    assert all(took < 6 for took, _ in outcomes), f"not cut at the 2 s body-read deadline: {outcomes}"
    assert all(a.startswith(b"HTTP/1.1 408") and b"body_read_timeout" in a for _, a in outcomes), outcomes


async def test_one_tenant_never_fills_the_engine_batch(small, wav):
    """max_num_seqs is 4: a flooding tenant holds at most 3 slots (3/4 of the batch, not 3/4 of the
    8-slot pipeline), so another tenant's request joins the running batch instead of queueing in
    vLLM behind the flood."""
    async with httpx.AsyncClient(base_url=small.url, timeout=120) as c:

        async def ttft(tenant: str) -> float:
            t0 = time.perf_counter()
            async with c.stream("POST", "/v1/audio/chat", files={"file": ("q.wav", wav)},
                                data={**GOOD, "max_tokens": "4", "stream": "true"},
                                headers={"X-Tenant": tenant}) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if '"token_ids":[' in line.replace(" ", ""):
                        return time.perf_counter() - t0
            raise AssertionError("no token")

        solo = min([await ttft("B") for _ in range(3)])

        async def flood() -> None:
            r = await c.post("/v1/audio/chat", files={"file": ("q.wav", wav)},
                             data={**GOOD, "max_tokens": "900"},
                             headers={"X-Tenant": "A"})
            assert r.status_code in (200, 429), r.text

        flooders = [asyncio.create_task(flood()) for _ in range(8)]
        try:
            await asyncio.sleep(2.0)
            in_flight = _gauge(small.url, "aura_requests_in_flight")
            assert in_flight <= 3, f"tenant A holds {in_flight} slots; the engine batch has 4 rows"
            loaded = [await ttft("B") for _ in range(3)]
        finally:
            for f in flooders:
                f.cancel()
            await asyncio.gather(*flooders, return_exceptions=True)
    assert min(loaded) < 5 * solo + 0.5, f"B's TTFT {loaded} vs solo {solo:.3f} s"
