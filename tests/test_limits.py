"""Limits and bad input: each case gets its status and a reason, and the server still answers a
good request with exactly the tokens it gave before. Plus the admission controller in isolation."""

from __future__ import annotations

import asyncio
import base64
import io
import socket
import struct
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest
import soundfile as sf

from server.errors import TooManyRequests
from server.admission import AdmissionController, Deadline, DeadlineExceeded

# ---- the admission controller on its own (no server) -------------------------------------------


def _controller(**kw) -> AdmissionController:
    args = dict(max_concurrent=2, max_queued=2, tenant_max_concurrent=2, tenant_max_queued=1, queue_timeout_s=5)
    return AdmissionController(**{**args, **kw})


async def test_admission_is_bounded_and_answers_429_with_retry_after():
    c = _controller()
    a1, a2 = await c.acquire("a"), await c.acquire("b")
    assert (c.running, c.waiting) == (2, 0)
    waiter = asyncio.create_task(c.acquire("c"))
    await asyncio.sleep(0)
    assert c.waiting == 1
    other = asyncio.create_task(c.acquire("d"))
    await asyncio.sleep(0)
    with pytest.raises(TooManyRequests) as e:
        await c.acquire("e")  # 2 running + 2 waiting: full
    assert e.value.code == "server_busy" and e.value.headers["Retry-After"] == "1"
    a1.release()
    a1.release()  # idempotent
    slot = await asyncio.wait_for(waiter, 1)
    assert slot.tenant == "c" and slot.waited_s >= 0
    a2.release()
    d = await asyncio.wait_for(other, 1)
    for s in (slot, d):
        s.release()
    assert (c.running, c.waiting) == (0, 0)


async def test_a_tenant_at_its_cap_waits_while_others_go_first():
    c = _controller(max_concurrent=3, tenant_max_concurrent=1, max_queued=4)
    a = await c.acquire("a")
    a_next = asyncio.create_task(c.acquire("a"))
    await asyncio.sleep(0)
    with pytest.raises(TooManyRequests) as e:
        await c.acquire("a")  # its queue share (1) is taken
    assert e.value.code == "tenant_concurrency_limit"
    b = await asyncio.wait_for(c.acquire("b"), 1)  # b is not behind a's waiter
    assert not a_next.done()
    a.release()
    a2 = await asyncio.wait_for(a_next, 1)
    for s in (a2, b):
        s.release()
    assert c.running == 0


async def test_round_robin_between_waiting_tenants():
    c = _controller(max_concurrent=1, max_queued=10, tenant_max_concurrent=1, tenant_max_queued=5)
    first = await c.acquire("x")
    order: list[str] = []

    async def take(t: str) -> None:
        s = await c.acquire(t)
        order.append(t)
        await asyncio.sleep(0)
        s.release()

    tasks = [asyncio.create_task(take(t)) for t in ("a", "a", "a", "b", "b")]
    await asyncio.sleep(0)
    first.release()
    await asyncio.wait_for(asyncio.gather(*tasks), 2)
    assert order[:4] == ["a", "b", "a", "b"]


async def test_queue_timeout_and_cancelled_waiters_leave_no_trace():
    c = _controller(max_concurrent=1, queue_timeout_s=0.05)
    held = await c.acquire("a")
    with pytest.raises(TooManyRequests) as e:
        await c.acquire("b")
    assert e.value.code == "queue_timeout"
    t = asyncio.create_task(c.acquire("b", timeout=5))
    await asyncio.sleep(0.01)
    t.cancel()
    await asyncio.gather(t, return_exceptions=True)
    assert (c.running, c.waiting) == (1, 0)
    held.release()
    assert (c.running, c.waiting) == (0, 0)


def test_deadline_tightens_but_never_extends():
    d = Deadline.after(10)
    assert d.tighten(None) is d and d.tighten(20) is d
    short = d.tighten(0.001)
    assert short.timeout_s == 0.001 and short.at < d.at
    with pytest.raises(DeadlineExceeded) as e:
        Deadline.after(-1).check("decoding audio")
    assert e.value.status_code == 504 and "decoding audio" in e.value.message


# ---- bad input against the real server ---------------------------------------------------------


def wav_bytes(samples: np.ndarray, sr: int = 16000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def raw_wav(sample_rate: int, channels: int, frames: int = 1600) -> bytes:
    """A PCM WAV written by hand, so the header can say what no encoder would write."""
    data = bytes(frames * channels * 2)
    fmt = struct.pack("<HHIIHH", 1, channels, sample_rate, (sample_rate * channels * 2) & 0xFFFFFFFF,
                      channels * 2, 16)
    return (b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVEfmt " + struct.pack("<I", 16) + fmt
            + b"data" + struct.pack("<I", len(data)) + data)


GOOD = {"adapter": "alpha", "max_tokens": "6", "return_token_ids": "true"}


def good_tokens(url: str, wav: bytes) -> list[int]:
    r = httpx.post(f"{url}/v1/audio/chat", files={"file": ("q.wav", wav)}, data=GOOD, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


@pytest.fixture(scope="module")
def baseline(server, speech) -> tuple[bytes, list[int]]:
    wav = speech["capital"].read_bytes()
    return wav, good_tokens(server.url, wav)


def _raw_request(url: str, head: bytes) -> bytes:
    """Send only the headers of a request (no body) and read what comes back."""
    u = urlparse(url)
    with socket.create_connection((u.hostname, u.port), timeout=10) as s:
        s.sendall(head)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while data := s.recv(65536):
            chunks.append(data)
    return b"".join(chunks)


CASES = [
    # kind, status, error code (None: any)
    ("upload_too_large", 413, "audio_too_large"),
    ("content_length_too_large", 413, "request_too_large"),
    ("audio_too_long", 413, "audio_too_long"),
    ("not_audio", 415, "audio_unsupported"),
    ("truncated_header", 415, "audio_unsupported"),
    ("no_frames", 400, "audio_empty"),
    ("zero_length_wav", 400, "audio_empty"),
    ("empty_file", 400, "audio_empty"),
    ("zero_channels", 400, "audio_corrupt"),
    ("sample_rate_1hz", 400, "audio_bad_params"),
    ("sample_rate_4ghz", 415, "audio_unsupported"),
    ("sixty_four_channels", 400, "audio_bad_params"),
    ("malformed_json", 422, "invalid_json"),
    ("json_not_an_object", 422, None),
    ("schema_wrong_types", 422, None),
    ("empty_messages", 422, None),
    ("n_two", 422, None),
    ("negative_timeout", 422, None),
    ("unknown_adapter", 404, "adapter_not_found"),
    ("max_tokens_too_large", 400, "max_tokens_too_large"),
    ("max_tokens_zero", 422, None),
    ("silence", 200, None),
]


@pytest.mark.parametrize("kind, status, code", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_clearly_and_changes_nothing(server, baseline, kind, status, code):
    url = f"{server.url}/v1/audio/chat"
    wav, tokens = baseline

    def form(data: bytes, **fields: str) -> httpx.Response:
        return httpx.post(url, files={"file": ("q.wav", data)}, data={**GOOD, **fields}, timeout=120)

    def chat(body) -> httpx.Response:
        return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)

    audio_part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}}
    if kind == "upload_too_large":
        r = form(b"RIFF" + np.random.default_rng(0).bytes(25 * 1024 * 1024 + 10))
    elif kind == "content_length_too_large":
        u = urlparse(server.url)
        raw = _raw_request(server.url, (
            f"POST /v1/audio/chat HTTP/1.1\r\nHost: {u.hostname}\r\nContent-Type: multipart/form-data; "
            f"boundary=x\r\nContent-Length: {10**12}\r\nConnection: close\r\n\r\n").encode())
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.split(b" ")[1] == b"413", raw[:300]
        r = httpx.Response(413, content=body, headers={"content-type": "application/json"})
    elif kind == "audio_too_long":
        r = form(wav_bytes(np.zeros(16000 * 61, dtype=np.float32)))
    elif kind == "not_audio":
        r = form(b"this is not audio at all" * 20)
    elif kind == "truncated_header":
        r = form(wav[:20])
    elif kind == "no_frames":
        r = form(wav[:44])
    elif kind == "zero_length_wav":
        r = form(wav_bytes(np.zeros(0, dtype=np.float32)))
    elif kind == "empty_file":
        r = form(b"")
    elif kind == "zero_channels":
        r = form(raw_wav(16000, 0))
    elif kind == "sample_rate_1hz":
        r = form(raw_wav(1, 1))
    elif kind == "sample_rate_4ghz":
        r = form(raw_wav(4_000_000_000, 1))
    elif kind == "sixty_four_channels":
        r = form(raw_wav(16000, 64))
    elif kind == "malformed_json":
        r = httpx.post(url, content=b'{"messages": [', headers={"content-type": "application/json"})
    elif kind == "json_not_an_object":
        r = chat([1, 2, 3])
    elif kind == "schema_wrong_types":
        r = chat({"messages": [{"role": "robot", "content": 5}], "max_tokens": "many"})
    elif kind == "empty_messages":
        r = chat({"messages": []})
    elif kind == "n_two":
        r = chat({"messages": [{"role": "user", "content": [audio_part]}], "n": 2})
    elif kind == "negative_timeout":
        r = chat({"messages": [{"role": "user", "content": [audio_part]}], "timeout": -1})
    elif kind == "unknown_adapter":
        r = form(wav, adapter="no-such-adapter")
    elif kind == "max_tokens_too_large":
        r = form(wav, max_tokens="1000000")
    elif kind == "max_tokens_zero":
        r = form(wav, max_tokens="0")
    else:  # silence: valid audio, a normal answer
        r = form(wav_bytes(np.zeros(32000, dtype=np.float32)))
    assert r.status_code == status, r.text
    if status != 200:
        err = r.json()["error"]
        assert err["message"] and err["type"]
        if code:
            assert err["code"] == code, err
    assert good_tokens(server.url, wav) == tokens, "a bad request changed what a good one gets"


def test_tenant_comes_from_the_api_key_else_the_trusted_header_else_default():
    from server.config import Settings
    from server.routes.door import tenant_of
    from server.tenancy import OPEN_PRINCIPAL, Principal

    keyed = Principal(tenant="acme")
    opened = OPEN_PRINCIPAL
    plain, trusting = Settings(), Settings(tenant_header="x-tenant")
    assert tenant_of(keyed, {"x-tenant": "evil"}, trusting) == "acme"  # a key outranks the header
    assert tenant_of(opened, {"x-tenant": "t1"}, trusting) == "t1"
    assert tenant_of(opened, {"x-tenant": "t1"}, plain) == OPEN_PRINCIPAL.tenant
    assert tenant_of(None, {}, plain) == "default"
    assert tenant_of(opened, {"x-tenant": "bad tenant\n"}, trusting) == OPEN_PRINCIPAL.tenant
    assert Settings(max_concurrent_requests=64).resolved_tenant_max_concurrent() == 48
    assert Settings(max_concurrent_requests=1).resolved_tenant_max_concurrent() == 1
