"""``aura serve --replicas 2`` on a real local Ray cluster (CPU, the tiny model, real vLLM per replica).

One cluster serves the whole module (a Ray cluster and two engines cost ~1 min to start on 2
cores), so the tests run in file order: routing first (it needs replicas that hold nothing yet),
then parity and the hot swap, then the two that break things (a killed replica, SIGTERM).
Every answer is compared token for token with the single ``aura serve`` of tests/conftest.py.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest

from conftest import Tiny
from launch import ROOT, ServerProc, free_port, start_server, stop_server
from sse import Stream, parse_sse
from test_serving_api import post_audio

pytest.importorskip("ray.serve")

LONG = 400  # tokens in a "long" stream: several seconds on this CPU, so things can happen during it


def free_ports(n: int) -> int:
    """The first of ``n`` consecutive free loopback ports."""
    for _ in range(100):
        first = free_port()
        try:
            for p in range(first, first + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return first
        except OSError:
            continue
    raise RuntimeError("no consecutive free ports")


METRICS_PORT = free_ports(2)


@pytest.fixture(scope="module")
def cluster(tiny: Tiny, tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("ray-home")
    args = ["--replicas", "2", "--replica-metrics-port", str(METRICS_PORT), "--model", str(tiny.llm), "--dtype", "float32", "--max-num-seqs", "32",
            "--max-model-len", "1024", "--cpu-kv-cache-gib", "0.25", "--ray-num-cpus", "2",
            "--drain-timeout", "60"]
    for name, path in tiny.adapters.items():
        args += ["--adapter", f"{name}={path}"]
    srv = start_server(args, home, home / "cluster.log", timeout=600)
    yield srv
    if srv.proc.poll() is None:
        stop_server(srv)


def chat(url: str, adapter: str, text: str = "hi there", max_tokens: int = 12, **extra) -> httpx.Response:
    body = {"model": adapter, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 0, "return_token_ids": True, **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)


def tokens(r: httpx.Response) -> list[int]:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def replica_of(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return r.headers["x-aura-replica"]


def listing(url: str) -> dict:
    return httpx.get(f"{url}/v1/adapters", timeout=30).json()


class BackgroundStream(threading.Thread):
    """A streaming chat request read in a thread, each SSE line stamped with its arrival time."""

    def __init__(self, url: str, adapter: str, text: str, max_tokens: int = LONG) -> None:
        super().__init__(daemon=True)
        self.body = {"model": adapter, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
                     "temperature": 0, "return_token_ids": True, "stream": True}
        self.url = url
        self.lines: list[tuple[float, str]] = []
        self.headers: dict[str, str] = {}
        self.started = threading.Event()  # the first content chunk arrived
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.stream("POST", f"{self.url}/v1/chat/completions", json=self.body, timeout=120) as r:
                self.headers = dict(r.headers)
                for line in r.iter_lines():
                    self.lines.append((time.monotonic(), line))
                    if '"token_ids":[' in line:
                        self.started.set()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e
        finally:
            self.started.set()

    def result(self, timeout: float = 120) -> Stream:
        self.join(timeout)
        assert not self.is_alive(), "the stream hung"
        assert self.error is None, repr(self.error)
        return parse_sse([line for _, line in self.lines])


def test_requests_follow_their_adapter_and_spread(cluster: ServerProc):
    first = replica_of(chat(cluster.url, "alpha"))
    # Serve learns which replica holds which adapter from the replica's report (pushed, not
    # instant); give it a moment so the next routing decisions see it.
    time.sleep(2)
    assert [replica_of(chat(cluster.url, "alpha")) for _ in range(4)] == [first] * 4
    other = replica_of(chat(cluster.url, "beta"))
    assert other != first, "a second adapter should go to the replica holding none (Serve's fewest-models rule)"
    time.sleep(2)
    assert [replica_of(chat(cluster.url, "beta")) for _ in range(4)] == [other] * 4
    assert replica_of(chat(cluster.url, "alpha")) == first
    data = {a["name"]: a for a in listing(cluster.url)["data"]}
    assert data["alpha"]["replicas"] == {first: 1}
    assert data["beta"]["replicas"] == {other: 1}
    loads = {r["replica"]: r["loads"] for r in listing(cluster.url)["replicas"]}
    assert loads == {first: 1, other: 1}, "each adapter loaded once, on its own replica"
    # The same from each replica's own /metrics (replica label next to adapter and tenant).
    for replica, alpha, beta in ((first, 6, 0), (other, 0, 5)):
        text = replica_metrics(replica)
        assert "vllm:" in text, "the replica's engine metrics are served too"
        assert sample(text, "aura_generations_total", adapter="alpha", outcome="ok", replica=replica) == alpha
        assert sample(text, "aura_generations_total", adapter="beta", outcome="ok", replica=replica) == beta


@pytest.mark.parametrize("adapter", ["alpha", "beta"])
def test_answers_equal_the_single_server(cluster: ServerProc, server: ServerProc, speech, adapter: str):
    for text in ("hi there", "What is the capital of France?"):
        assert tokens(chat(cluster.url, adapter, text, 24)) == tokens(chat(server.url, adapter, text, 24))
    # Audio crosses the ingress -> replica boundary too (multipart upload, the replica's front end).
    ray_audio = post_audio(cluster.url, speech["capital"], adapter=adapter, max_tokens=16, return_token_ids=True)
    one_audio = post_audio(server.url, speech["capital"], adapter=adapter, max_tokens=16, return_token_ids=True)
    assert tokens(ray_audio) == tokens(one_audio)
    assert ray_audio.headers["x-aura-replica"]
    # Streaming: the same tokens as SSE, ending in [DONE].
    s = BackgroundStream(cluster.url, adapter, "hi there", 24)
    s.start()
    stream = s.result()
    assert stream.done and stream.error is None
    assert stream.token_ids == tokens(chat(server.url, adapter, "hi there", 24))
    assert s.headers["x-aura-replica"]


def test_a_request_naming_no_adapter_runs_on_the_clusters_default(cluster: ServerProc):
    """No model, the base model's name or "default": the catalog's default adapter answers, with
    the same tokens as naming it (the ingress resolves it in one catalog call)."""
    default = httpx.get(f"{cluster.url}/ready", timeout=30).json()["default_adapter"]
    assert default in ("alpha", "beta")
    named = tokens(chat(cluster.url, default))
    other = "beta" if default == "alpha" else "alpha"
    assert tokens(chat(cluster.url, other)) != named  # so the wrong adapter could not pass unseen
    assert tokens(chat(cluster.url, "default")) == named
    body = {"messages": [{"role": "user", "content": "hi there"}], "max_tokens": 12, "temperature": 0,
            "return_token_ids": True}
    assert tokens(httpx.post(f"{cluster.url}/v1/chat/completions", json=body, timeout=120)) == named


def test_errors_keep_their_status_and_shape(cluster: ServerProc):
    r = chat(cluster.url, "nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "adapter_not_found"
    r = chat(cluster.url, "alpha", max_tokens=10**6)
    assert r.status_code == 400 and r.json()["error"]["code"] == "max_tokens_too_large"


def replica_metrics(replica: str) -> str:
    """The Prometheus text of one model replica (found by its replica label)."""
    for port in (METRICS_PORT, METRICS_PORT + 1):
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        if f'replica="{replica}"' in text:
            return text
    raise AssertionError(f"no metrics endpoint serves {replica}")


def sample(text: str, metric: str, **labels: str) -> float:
    total = 0.0
    for m in re.finditer(rf"^{re.escape(metric)}\{{([^}}]*)\}} (\S+)$", text, re.M):
        found = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total


def test_client_disconnect_aborts_the_replicas_engine_request(cluster: ServerProc):
    body = {"model": "alpha", "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": LONG, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{cluster.url}/v1/chat/completions", json=body, timeout=120) as r:
        replica = r.headers["x-aura-replica"]
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
    # Gone after a few chunks: the ingress cancels the replica's stream, which aborts its engine request.
    deadline = time.monotonic() + 30
    while True:
        text = replica_metrics(replica)
        aborted = sample(text, "aura_generations_total", adapter="alpha", outcome="aborted")
        if aborted == 1 and sample(text, "aura_engine_requests_unfinished") == 0:
            break
        assert time.monotonic() < deadline, (aborted, sample(text, "aura_engine_requests_unfinished"))
        time.sleep(0.5)


def test_hot_swap_while_a_long_stream_runs(cluster: ServerProc, server: ServerProc, tiny: Tiny):
    text = "Tell me a long story about the sea."
    want_v1 = tokens(chat(server.url, "alpha", text, LONG))
    want_v2 = tokens(chat(server.url, "beta", text, 24))
    assert want_v1[:24] != want_v2
    long = BackgroundStream(cluster.url, "alpha", text)
    long.start()
    assert long.started.wait(120)
    r = httpx.post(f"{cluster.url}/v1/adapters", json={"name": "alpha", "source": str(tiny.adapters["beta"])},
                   timeout=120)
    acked = time.monotonic()
    assert r.status_code == 200, r.text
    assert r.json()["version"] == 2
    # Acknowledged: every later request gets v2's tokens, while the running stream stays on v1.
    for _ in range(3):
        assert tokens(chat(cluster.url, "alpha", text, 24)) == want_v2
    stream = long.result()
    assert stream.done and stream.error is None
    assert any(t > acked for t, _ in long.lines), "the swap should happen while the stream runs"
    assert stream.token_ids == want_v1, "a running stream finishes on the version it started with"
    alpha = next(a for a in listing(cluster.url)["data"] if a["name"] == "alpha")
    assert alpha["version"] == 2 and set(alpha["replicas"].values()) == {2}


def test_killed_replica_ends_its_stream_with_an_error_event(cluster: ServerProc):
    long = BackgroundStream(cluster.url, "beta", "Tell me a long story about the sea.")
    long.start()
    assert long.started.wait(120)
    victim = long.headers["x-aura-replica"]
    pid = next(r["pid"] for r in listing(cluster.url)["replicas"] if r["replica"] == victim)
    proc = psutil.Process(pid)
    children = proc.children(recursive=True)  # its vLLM engine process
    os.kill(pid, signal.SIGKILL)
    stream = long.result(timeout=60)
    assert stream.error is not None, "the stream must end with an error event, not a hang or a silent cut"
    assert stream.error["code"] == "replica_failed"
    assert not stream.done
    # A SIGKILLed actor cannot stop its engine: the engine's parent watchdog must end it.
    _, alive = psutil.wait_procs(children, timeout=30)
    for child in alive:
        child.kill()
    assert not alive, f"the dead replica's engine processes outlived it: {[c.pid for c in alive]}"
    # Later requests succeed: Serve routes around the dead replica and restarts it.
    deadline = time.monotonic() + 180
    while True:
        r = chat(cluster.url, "beta")
        if r.status_code == 200:
            break
        assert r.status_code == 503 and r.json()["error"]["code"] == "replica_failed", r.text
        assert time.monotonic() < deadline, "no replica answered after the kill"
        time.sleep(2)
    assert r.headers["x-aura-replica"] != victim


def test_sigterm_drains_running_streams(cluster: ServerProc):
    long = BackgroundStream(cluster.url, "alpha", "Tell me a long story about the sea.", 200)
    long.start()
    assert long.started.wait(120)
    cluster.proc.send_signal(signal.SIGTERM)
    stream = long.result(timeout=120)
    assert stream.error is None and stream.done, "a running stream finishes to [DONE] on SIGTERM"
    assert len(stream.token_ids) > 0
    assert cluster.proc.wait(timeout=120) == 0
    assert "drained unfinished=0" in cluster.log.read_text()


# ---- a second cluster on Serve's default routing (no multiplexing), after the first one stopped ----

@pytest.fixture(scope="module")
def spread_cluster(tiny: Tiny, tmp_path_factory: pytest.TempPathFactory):
    """Without adapter affinity every replica ends up loading every adapter: what a replace must
    keep consistent across replicas."""
    home = tmp_path_factory.mktemp("ray-home-spread")
    args = ["--replicas", "2", "--no-replica-affinity", "--model", str(tiny.llm), "--dtype", "float32",
            "--max-num-seqs", "32", "--max-model-len", "1024", "--cpu-kv-cache-gib", "0.25", "--ray-num-cpus", "2"]
    for name, path in tiny.adapters.items():
        args += ["--adapter", f"{name}={path}"]
    srv = start_server(args, home, home / "cluster.log", timeout=600)
    yield srv
    stop_server(srv)


def test_replace_reaches_every_replica(spread_cluster: ServerProc, server: ServerProc, tiny: Tiny):
    url = spread_cluster.url
    text = "Tell me a long story about the sea."
    want_v1 = tokens(chat(server.url, "alpha", text, LONG))
    want_v2 = tokens(chat(server.url, "beta", text, 24))
    for _ in range(30):  # random routing: soon both replicas hold alpha v1
        assert tokens(chat(url, "alpha", text, 24)) == want_v1[:24]
        alpha = next(a for a in listing(url)["data"] if a["name"] == "alpha")
        if len(alpha["replicas"]) == 2:
            break
    assert alpha["replicas"] and set(alpha["replicas"].values()) == {1} and len(alpha["replicas"]) == 2
    long = BackgroundStream(url, "alpha", text)
    long.start()
    assert long.started.wait(120)
    r = httpx.post(f"{url}/v1/adapters", json={"name": "alpha", "source": str(tiny.adapters["beta"])}, timeout=120)
    assert r.status_code == 200 and r.json()["version"] == 2, r.text
    seen: set[str] = set()
    for _ in range(30):  # whichever replica answers, it answers with v2 (the stale one reloads first)
        reply = chat(url, "alpha", text, 24)
        assert tokens(reply) == want_v2
        seen.add(replica_of(reply))
        if len(seen) == 2:
            break
    assert len(seen) == 2
    stream = long.result()
    assert stream.done and stream.token_ids == want_v1, "the running stream finished on v1"
    deadline = time.monotonic() + 30
    while True:  # v1 leaves both engines once its last stream ended
        state = listing(url)
        alpha = next(a for a in state["data"] if a["name"] == "alpha")
        engines = [r["engine_versions"].get("alpha") for r in state["replicas"]]
        if set(alpha["replicas"].values()) == {2} and engines == [1, 1]:
            break
        assert time.monotonic() < deadline, (alpha, engines)
        time.sleep(0.5)


def test_a_plain_server_never_imports_ray():
    code = ("import sys; import server.cli, server.app, server.state, server.routes.chat, server.cluster; "
            "server.cli.settings_from_args(server.cli.build_parser().parse_args(['serve'])); "
            "assert 'ray' not in sys.modules, 'ray was imported'")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]


def test_replica_label_is_added_to_every_sample():
    from server.cluster.replica_metrics import with_label

    text = ('# HELP x_total help {not a label}\n# TYPE x_total counter\nx_total 3.0\n'
            'y{adapter="a",tenant="t b"} 1\nvllm:lora_requests_info{running_lora_adapters="p,q"} 1.7e+09\n')
    out = with_label(text, "replica", 'M-"1"')
    assert out.splitlines() == [
        "# HELP x_total help {not a label}", "# TYPE x_total counter", 'x_total{replica="M-\\"1\\""} 3.0',
        'y{replica="M-\\"1\\"",adapter="a",tenant="t b"} 1',
        'vllm:lora_requests_info{replica="M-\\"1\\"",running_lora_adapters="p,q"} 1.7e+09']
