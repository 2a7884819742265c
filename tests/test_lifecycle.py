"""Reliability against a real ``aura serve`` process: backpressure, tenant fairness, client
disconnects, deadlines, request ids in the logs, graceful drain on SIGTERM, and a dead engine.

These tests are destructive (they fill the server, time requests out, SIGTERM it, kill its engine),
so they run on dedicated servers: one module-scoped server with tiny limits for everything up to
the drain test (which ends it), and one more for the engine-kill test.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import statistics
import time

import httpx
import psutil
import pytest

from conftest import start_server, stop_server
from sse import parse_sse

DRAIN_TOKENS = 1000  # long enough to be mid-stream at SIGTERM, short enough to finish in the grace period
LONG = 1900  # tokens: a stream that lasts many seconds on the tiny model (context 2048)
LIMITS = dict(max_concurrent=4, max_queued=2, tenant_max_concurrent=2)  # tenant queue share: 2 // 2 = 1


def _args(tiny) -> list[str]:
    args = ["--model", str(tiny.llm), "--dtype", "float32", "--max-num-seqs", "16", "--max-model-len", "2048",
            "--max-concurrent-requests", str(LIMITS["max_concurrent"]),
            "--max-queued-requests", str(LIMITS["max_queued"]),
            "--tenant-max-concurrent", str(LIMITS["tenant_max_concurrent"]),
            "--tenant-header", "X-Tenant", "--request-timeout", "120", "--drain-timeout", "60",
            "--log-format", "json"]
    for name, path in tiny.adapters.items():
        args += ["--adapter", f"{name}={path}"]
    return args


@pytest.fixture(scope="module")
def limited(tiny, tmp_path_factory):
    home = tmp_path_factory.mktemp("limited")
    srv = start_server(_args(tiny), home, home / "server.log")
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def wav(speech) -> bytes:
    return speech["capital"].read_bytes()


def _form(adapter: str = "alpha", max_tokens: int = 8, stream: bool = True, **extra) -> dict[str, str]:
    return {"adapter": adapter, "max_tokens": str(max_tokens), "stream": str(stream).lower(),
            "return_token_ids": "true", **{k: str(v) for k, v in extra.items()}}


def gauge(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    m = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)
    assert m, f"{name} missing from /metrics"
    return float(m.group(1))


async def wait_until(pred, timeout: float = 15.0, every: float = 0.1) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        await asyncio.sleep(every)
    return pred()


class OpenStream:
    """A streaming request held open after its first token, to occupy a pipeline slot."""

    def __init__(self, client: httpx.AsyncClient, wav: bytes, tenant: str, **form) -> None:
        self.client, self.wav, self.tenant, self.form = client, wav, tenant, form
        self.status: int | None = None
        self.first_token = asyncio.Event()
        self.lines: list[str] = []
        self.task: asyncio.Task | None = None

    async def _run(self) -> None:
        async with self.client.stream("POST", "/v1/audio/chat", files={"file": ("q.wav", self.wav)},
                                      data=_form(**self.form), headers={"X-Tenant": self.tenant}) as r:
            self.status = r.status_code
            if r.status_code != 200:
                self.lines.append((await r.aread()).decode())
                self.first_token.set()
                return
            async for line in r.aiter_lines():
                self.lines.append(line)
                if '"token_ids":[' in line.replace(" ", ""):
                    self.first_token.set()
        self.first_token.set()

    def start(self) -> "OpenStream":
        self.task = asyncio.create_task(self._run())
        return self

    async def started(self, timeout: float = 60.0) -> None:
        await asyncio.wait_for(self.first_token.wait(), timeout)

    async def cancel(self) -> None:
        """Disconnect mid-stream (what a client closing its socket looks like to the server)."""
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)


async def _ttft(client: httpx.AsyncClient, wav: bytes, tenant: str) -> float:
    t0 = time.perf_counter()
    async with client.stream("POST", "/v1/audio/chat", files={"file": ("q.wav", wav)},
                             data=_form(max_tokens=4), headers={"X-Tenant": tenant}) as r:
        assert r.status_code == 200, await r.aread()
        ttft = None
        async for line in r.aiter_lines():
            if ttft is None and '"token_ids":[' in line.replace(" ", ""):
                ttft = time.perf_counter() - t0
    assert ttft is not None, "no token arrived"
    return ttft


async def _idle(url: str) -> bool:
    """Nothing in the pipeline, nothing queued, nothing left in the engine."""
    return await wait_until(lambda: gauge(url, "aura_requests_in_flight") == 0
                            and gauge(url, "aura_requests_queued") == 0
                            and gauge(url, "aura_engine_requests_unfinished") == 0, timeout=20)


async def test_client_disconnect_aborts_the_engine_request(limited, wav):
    async with httpx.AsyncClient(base_url=limited.url, timeout=120) as client:
        streams = [OpenStream(client, wav, "t-cancel", max_tokens=LONG, adapter=a).start() for a in ("alpha", "beta")]
        for s in streams:
            await s.started()
        assert gauge(limited.url, "aura_engine_requests_unfinished") == 2
        assert gauge(limited.url, "aura_requests_in_flight") == 2
        t0 = time.monotonic()
        for s in streams:
            await s.cancel()
        assert await _idle(limited.url), "the engine still holds requests whose clients left"
        assert time.monotonic() - t0 < 10
        text = httpx.get(f"{limited.url}/metrics").text
        assert re.search(r'^aura_generations_total\{adapter="alpha",outcome="aborted",tenant="t-cancel"\} 1\.0$',
                         text, re.M), "the disconnect must count as an aborted generation"
        assert await wait_until(lambda: gauge(limited.url, "vllm:num_requests_running") == 0, timeout=10)


async def test_tenant_cap_and_full_queue_answer_429_with_retry_after(limited, wav):
    async with httpx.AsyncClient(base_url=limited.url, timeout=120) as client:
        # tenant A takes its two slots; a third A request queues (its queue share is 1); a fourth is refused.
        a = [OpenStream(client, wav, "A", max_tokens=LONG).start() for _ in range(2)]
        for s in a:
            await s.started()
        a_queued = OpenStream(client, wav, "A", max_tokens=4).start()
        assert await wait_until(lambda: gauge(limited.url, "aura_requests_queued") == 1)
        r = await client.post("/v1/audio/chat", files={"file": ("q.wav", wav)}, data=_form(stream=False),
                              headers={"X-Tenant": "A"})
        assert r.status_code == 429, r.text
        assert r.json()["error"]["code"] == "tenant_concurrency_limit"
        assert int(r.headers["retry-after"]) >= 1
        # tenant B still gets in at once, although A is queued ahead of it
        b = [OpenStream(client, wav, "B", max_tokens=LONG).start() for _ in range(2)]
        for s in b:
            await s.started(timeout=30)
        assert gauge(limited.url, "aura_requests_in_flight") == 4
        # pipeline full (4) + queue: A's waiter, then C's; D finds the queue full
        c_queued = OpenStream(client, wav, "C", max_tokens=4).start()
        assert await wait_until(lambda: gauge(limited.url, "aura_requests_queued") == 2)
        r = await client.post("/v1/audio/chat", files={"file": ("q.wav", wav)}, data=_form(stream=False),
                              headers={"X-Tenant": "D"})
        assert r.status_code == 429 and r.json()["error"]["code"] == "server_busy"
        assert int(r.headers["retry-after"]) >= 1
        # free one of B's slots: C (another tenant) is served before A's second waiter? A is under
        # its cap only when one of A's streams ends, so C must be the one admitted.
        await b[0].cancel()
        await c_queued.started(timeout=30)
        assert c_queued.status == 200
        assert a_queued.status is None, "A is at its cap: its waiter must not take the freed slot"
        for s in (*a, b[1]):
            await s.cancel()
        await a_queued.started(timeout=30)
        assert a_queued.status == 200
        await asyncio.gather(a_queued.task, c_queued.task, return_exceptions=True)
    assert await _idle(limited.url)
    text = httpx.get(f"{limited.url}/metrics").text
    assert re.search(r'^aura_requests_total\{adapter="none",code="429",tenant="D"\} 1\.0$', text, re.M)


async def test_a_flooding_tenant_does_not_raise_another_tenants_ttft(limited, wav):
    """Stated bound: tenant B's median TTFT while tenant A floods stays within 3x its solo median
    plus 0.5 s (A can hold at most 2 of the 4 slots, so B never queues behind A)."""
    async with httpx.AsyncClient(base_url=limited.url, timeout=120) as client:
        solo = [await _ttft(client, wav, "B") for _ in range(3)]
        statuses: list[int] = []
        stop = asyncio.Event()

        async def flood() -> None:
            while not stop.is_set():
                r = await client.post("/v1/audio/chat", files={"file": ("q.wav", wav)},
                                      data=_form(stream=False, max_tokens=64), headers={"X-Tenant": "A"})
                statuses.append(r.status_code)
                if r.status_code == 429:
                    await asyncio.sleep(0.1)  # a rude client: far sooner than Retry-After

        flooders = [asyncio.create_task(flood()) for _ in range(8)]
        await asyncio.sleep(1.0)
        try:
            loaded = [await _ttft(client, wav, "B") for _ in range(3)]
        finally:
            stop.set()
            await asyncio.gather(*flooders, return_exceptions=True)
    assert 429 in statuses and 200 in statuses, statuses
    bound = 3 * statistics.median(solo) + 0.5
    assert statistics.median(loaded) <= bound, f"B's TTFT {loaded} vs solo {solo} (bound {bound:.2f} s)"
    assert await _idle(limited.url)


async def test_deadline_aborts_with_a_clear_error(limited, wav):
    async with httpx.AsyncClient(base_url=limited.url, timeout=120) as client:
        r = await client.post("/v1/audio/chat", files={"file": ("q.wav", wav)},
                              data=_form(stream=False, max_tokens=LONG, timeout=0.5),
                              headers={"X-Request-ID": "deadline-json"})
        assert r.status_code == 504, r.text
        err = r.json()["error"]
        assert err["code"] == "deadline_exceeded" and "0.5 s" in err["message"]
        async with client.stream("POST", "/v1/audio/chat", files={"file": ("q.wav", wav)},
                                 data=_form(max_tokens=LONG, timeout=0.5),
                                 headers={"X-Request-ID": "deadline-sse"}) as r:
            assert r.status_code == 200
            s = parse_sse([line async for line in r.aiter_lines()])
        assert s.error is not None and s.error["code"] == "deadline_exceeded" and not s.done
        # JSON body field too
        body = {"model": "alpha", "max_tokens": LONG, "timeout": 0.5, "messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode()}}]}]}
        r = await client.post("/v1/chat/completions", json=body)
        assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
    assert await _idle(limited.url)


def test_every_log_line_of_a_request_carries_its_id(limited, wav):
    ok = httpx.post(f"{limited.url}/v1/audio/chat", files={"file": ("q.wav", wav)}, data=_form(stream=False),
                    headers={"X-Request-ID": "log-ok"}, timeout=60)
    assert ok.status_code == 200 and ok.headers["x-request-id"] == "log-ok"
    time.sleep(0.5)
    lines = [json.loads(line) for line in limited.log.read_text().splitlines() if line.startswith("{")]
    assert lines, "the server must log JSON lines"
    per_request = [x for x in lines if x.get("msg") in ("request finished", "request failed")]
    assert per_request and all(x.get("request_id") for x in per_request), per_request
    by_id = {rid: [x for x in lines if x.get("request_id") == rid] for rid in ("log-ok", "deadline-json")}
    assert [x["outcome"] for x in by_id["log-ok"] if x["msg"] == "request finished"] == ["ok"]
    msgs = {x["msg"] for x in by_id["deadline-json"]}
    assert {"request finished", "request failed"} <= msgs, by_id["deadline-json"]
    sse = [x for x in lines if x.get("request_id") == "deadline-sse"]
    assert [x["outcome"] for x in sse if x["msg"] == "request finished"] == ["deadline"]


async def test_sigterm_drains_in_flight_streams_then_exits_zero(limited, wav):
    """Last in this module: it ends the server."""
    async with httpx.AsyncClient(base_url=limited.url, timeout=120) as client:
        streams = [OpenStream(client, wav, f"drain-{i}", max_tokens=DRAIN_TOKENS, adapter=a).start()
                   for i, a in enumerate(("alpha", "beta"))]
        for s in streams:
            await s.started()
        os.kill(limited.proc.pid, signal.SIGTERM)
        assert not any(s.task.done() for s in streams), "the streams must still be running at SIGTERM"
        assert await wait_until(lambda: httpx.get(f"{limited.url}/ready").status_code == 503, timeout=5)
        assert httpx.get(f"{limited.url}/ready").json()["status"] == "draining"
        r = await client.post("/v1/audio/chat", files={"file": ("q.wav", wav)}, data=_form(stream=False))
        assert r.status_code == 503 and r.json()["error"]["code"] == "draining"
        await asyncio.gather(*(s.task for s in streams))
    for s in streams:
        parsed = parse_sse(s.lines)
        assert parsed.done and parsed.error is None and parsed.finish_reason in ("length", "stop")
        assert parsed.finish_reason == "stop" or len(parsed.token_ids) == DRAIN_TOKENS
    rc = await asyncio.to_thread(limited.proc.wait, 60)
    assert rc == 0, limited.log.read_text()[-3000:]


def test_dead_engine_fails_health_and_requests_fast_then_exits_nonzero(tiny, wav, tmp_path_factory):
    """The engine cannot be brought back in place: the server answers 503 for a while (so probes and
    clients see why), then exits with status 3 for its supervisor to restart it."""
    home = tmp_path_factory.mktemp("doomed")
    srv = start_server(_args(tiny), home, home / "server.log", env={"AURA_ENGINE_DEATH_EXIT_S": "8"})
    try:
        cores = [p for p in psutil.Process(srv.proc.pid).children(recursive=True) if "EngineCore" in p.name()]
        assert cores, "no vLLM EngineCore child found"
        for p in cores:
            p.send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        while httpx.get(f"{srv.url}/health", timeout=5).status_code != 503:
            assert time.monotonic() - t0 < 10, "/health still ok 10 s after the engine died"
            time.sleep(0.2)
        assert httpx.get(f"{srv.url}/ready", timeout=5).status_code == 503
        t1 = time.monotonic()
        r = httpx.post(f"{srv.url}/v1/audio/chat", files={"file": ("q.wav", wav)}, data=_form(stream=False),
                       timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable", r.text
        assert time.monotonic() - t1 < 5
        r = httpx.post(f"{srv.url}/v1/audio/chat", files={"file": ("q.wav", wav)}, data=_form(stream=True),
                       timeout=30)
        assert r.status_code == 503
        rc = srv.proc.wait(timeout=60)
        assert rc == 3, f"exit status {rc}:\n{srv.log.read_text()[-3000:]}"
        assert "exiting non-zero for a supervisor restart" in srv.log.read_text()
    finally:
        stop_server(srv)


def test_engine_process_exits_when_the_api_process_is_killed(tiny, tmp_path_factory):
    """SIGKILL gives the API process no chance to stop vLLM's engine process; the engine process
    must notice on its own and exit instead of living on as an orphan holding the model."""
    home = tmp_path_factory.mktemp("orphan")
    srv = start_server(_args(tiny), home, home / "server.log")
    cores = [p for p in psutil.Process(srv.proc.pid).children(recursive=True) if "EngineCore" in p.name()]
    try:
        assert cores, "no vLLM EngineCore child found"
        srv.proc.send_signal(signal.SIGKILL)
        srv.proc.wait(timeout=10)
        gone, alive = psutil.wait_procs(cores, timeout=20)
        assert not alive, f"engine processes still alive 20 s after the API process was killed: {alive}"
    finally:
        for p in cores:
            if p.is_running():
                p.kill()
