"""The findings of a hostile-tenant review (issue 9), each replayed over HTTP against one real
server with two tenants (``acme`` may manage its adapters, ``globex`` may not) and an admin key.

Real local servers on loopback play the hostile sources: an HTTPS server that trickles one byte
per 100 ms, HTTPS servers that redirect to loopback or to plain http. The tenant's allowed
network is 127.0.0.2/32 only, so 127.0.0.1 stands for "the server's own loopback".
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import stat
import time
from pathlib import Path

import httpx
import pytest

from adapter_helpers import (
    copy_adapter, edit_json, file_server, rehash, make_tarball, redirect_server, self_signed_cert, trickle_server,
)
from adapters.adapter import AURA_CONFIG, LORA_CONFIG
from launch import start_server, stop_server
from server.tenancy import hash_key

ADMIN = {"Authorization": "Bearer admin-key"}
ACME = {"Authorization": "Bearer acme-key"}
GLOBEX = {"Authorization": "Bearer globex-key"}
METRICS = {"Authorization": "Bearer scrape-key"}
ALLOWED_HOST = "127.0.0.2"
FETCH_TIMEOUT_S = 3.0


@pytest.fixture(scope="module")
def env(tiny, tmp_path_factory):
    """Everything outside the server: certs, the tenants' adapter root, a private folder."""
    base = tmp_path_factory.mktemp("hostile")
    certfile, keyfile = self_signed_cert(base, ips=("127.0.0.1", ALLOWED_HOST))
    roots = base / "roots"
    roots.mkdir()
    copy_adapter(tiny.adapters["alpha"], roots / "alpha")
    return {"base": base, "cert": certfile, "key": keyfile, "roots": roots}


@pytest.fixture(scope="module")
def srv(tiny, env):
    home = env["base"] / "home"
    home.mkdir()
    config = {
        "admin_keys": [hash_key("admin-key")],
        "tenants": {
            "acme": {"keys": [hash_key("acme-key")], "manage": True,
                     "adapters": ["alpha", *(f"acme{i}" for i in range(12))], "default_adapter": "alpha"},
            "globex": {"keys": [hash_key("globex-key")], "adapters": ["beta"], "default_adapter": "beta"},
        },
        "adapters": [{"name": "alpha", "source": str(tiny.adapters["alpha"])},
                     {"name": "beta", "source": str(tiny.adapters["beta"])}],
    }
    cfg = home / "aura.yaml"
    cfg.write_text(json.dumps(config))
    args = ["--model", str(tiny.llm), "--dtype", "float32", "--max-num-seqs", "32", "--max-model-len", "1024",
            "--config", str(cfg)]
    server_env = {
        "AURA_ADAPTER_FETCH_TIMEOUT_S": str(FETCH_TIMEOUT_S),
        "AURA_ADAPTER_ROOTS": json.dumps([str(env["roots"])]),
        "AURA_ADAPTER_ALLOWED_NETWORKS": json.dumps([f"{ALLOWED_HOST}/32"]),
        "AURA_ADAPTER_CA_BUNDLE": str(env["cert"]),
        "AURA_METRICS_KEY": hash_key("scrape-key"),
    }
    server = start_server(args, home, home / "server.log", env=server_env)
    server.home = home  # type: ignore[attr-defined]
    yield server
    stop_server(server)


def _load(url: str, name: str, source: str, headers: dict = ACME, timeout: float = 60) -> httpx.Response:
    return httpx.post(f"{url}/v1/adapters", json={"name": name, "source": source}, headers=headers, timeout=timeout)


def _chat_tokens(url: str, wav: Path, adapter: str, headers: dict, timeout: float = 60) -> list[int]:
    r = httpx.post(f"{url}/v1/audio/chat", files={"file": ("q.wav", wav.read_bytes())},
                   data={"adapter": adapter, "max_tokens": "6", "return_token_ids": "true"}, headers=headers,
                   timeout=timeout)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def _cache_entries(srv) -> set[str]:
    return {p.name for p in (srv.home / "adapter-cache").iterdir()}


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


# ---- 1. a manage tenant stalls everyone -----------------------------------------------------------

def test_trickling_sources_time_out_really_stop_and_never_stall_other_tenants(srv, env, speech):
    wav = speech["sky"]
    t0 = time.monotonic()
    expected = _chat_tokens(srv.url, wav, "beta", GLOBEX)
    baseline_s = time.monotonic() - t0

    async def storm(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60, headers=ACME) as c:
            return await asyncio.gather(*(c.post(f"{srv.url}/v1/adapters",
                                                 json={"name": f"acme{i}", "source": f"{url}/a{i}.tar.gz"})
                                          for i in range(8)))

    with trickle_server(env["cert"], env["key"], host=ALLOWED_HOST) as (url, seen):
        t0 = time.monotonic()
        rs = asyncio.run(storm(url))
        storm_s = time.monotonic() - t0
        assert [r.status_code for r in rs] == [504] * 8, [r.text for r in rs]
        assert {r.json()["error"]["code"] for r in rs} == {"source_timeout"}
        assert storm_s < FETCH_TIMEOUT_S + 3
        # another tenant's chat is not held up by the fetch threads
        t0 = time.monotonic()
        assert _chat_tokens(srv.url, wav, "beta", GLOBEX, timeout=30) == expected
        assert time.monotonic() - t0 < baseline_s + 2.0
        # and the fetches really stopped: every trickling connection was hung up
        deadline = time.monotonic() + FETCH_TIMEOUT_S + 2
        while seen.open and time.monotonic() < deadline:
            time.sleep(0.1)
        assert seen.open == 0, f"{seen.open} fetches still reading after their 504"
        assert seen.total >= 1
    assert not [p for p in _cache_entries(srv) if p.startswith(".staging")]


@pytest.mark.parametrize("special", ["dev_zero", "fifo"])
def test_a_folder_with_a_device_or_fifo_is_refused_before_reading(srv, env, tiny, special):
    folder = copy_adapter(tiny.adapters["alpha"], env["roots"] / f"evil-{special}")
    (folder / "adapter_model.safetensors").unlink()
    if special == "dev_zero":
        (folder / "adapter_model.safetensors").symlink_to("/dev/zero")
    else:
        os.mkfifo(folder / "adapter_model.safetensors")
    before = _cache_entries(srv)
    for headers in (ACME, ADMIN):
        t0 = time.monotonic()
        r = _load(srv.url, "acme1", str(folder), headers=headers, timeout=30)
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == "source_unsafe_source"
        assert time.monotonic() - t0 < 2.0
    assert _cache_entries(srv) == before


# ---- 2. local paths are not confined ------------------------------------------------------------

def test_tenants_cannot_read_server_paths_and_every_refusal_reads_alike(srv, tiny, env, tmp_path):
    (tmp_path / "plain.tar.gz").write_bytes(b"x")
    link = env["roots"] / "escape"
    link.symlink_to(tiny.adapters["beta"])  # inside the roots, pointing outside
    probes = [str(tiny.adapters["beta"]), tiny.adapters["beta"].as_uri(), "/etc", "/etc/shadow", "/proc/1",
              "/proc/self/environ", str(tmp_path / "missing"), str(tmp_path / "plain.tar.gz"), str(link),
              "relative/path", str(env["roots"] / ".." / "home")]
    bodies = set()
    for source in probes:
        r = _load(srv.url, "acme2", source)
        assert r.status_code == 403, (source, r.text)
        bodies.add(r.text)
    assert len(bodies) == 1, bodies  # a folder, a file, a missing path and /proc look alike
    assert "acme2" not in {a["name"] for a in httpx.get(f"{srv.url}/v1/adapters", headers=ADMIN).json()["data"]}


def test_a_tenant_may_load_from_the_roots_and_the_cache_is_private(srv, env, speech):
    r = _load(srv.url, "acme3", str(env["roots"] / "alpha"))
    assert r.status_code == 200, r.text
    assert _chat_tokens(srv.url, speech["sky"], "acme3", ACME) == _chat_tokens(srv.url, speech["sky"], "alpha", ACME)
    cache = srv.home / "adapter-cache"
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    entries = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert entries
    for d in entries:
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
        for f in d.iterdir():
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f


def test_a_rejected_adapter_leaves_nothing_in_the_cache(srv, tiny, tmp_path):
    rank = copy_adapter(tiny.adapters["alpha"], tmp_path / "rank")
    edit_json(rank, LORA_CONFIG, r=128)
    (rank / "padding.safetensors").write_bytes(os.urandom(2 * 1024 * 1024))  # new content: a new digest
    zipped = tmp_path / "rank.tar.gz"
    make_tarball(rank, zipped)
    before = _cache_entries(srv)
    for source in (str(rank), str(zipped)):
        r = _load(srv.url, "acme4", source, headers=ADMIN)
        assert r.status_code == 422 and r.json()["error"]["code"] == "rank_too_large", r.text
    assert _cache_entries(srv) == before


# ---- 7. memory and disk bombs in adapter files ----------------------------------------------------

def test_config_bombs_are_refused_before_anything_is_built(srv, tiny, tmp_path):
    wide = copy_adapter(tiny.adapters["alpha"], tmp_path / "wide")
    edit_json(wide, AURA_CONFIG, audio_layer__conv_channels=10000)  # aura_config.json is not checksummed
    history = copy_adapter(tiny.adapters["alpha"], tmp_path / "history")
    cfg = json.loads((history / AURA_CONFIG).read_text())
    cfg["training"] = {"history": [{}] * 400_000}
    (history / AURA_CONFIG).write_text(json.dumps(cfg))
    small_history = copy_adapter(tiny.adapters["alpha"], tmp_path / "small-history")
    cfg["training"] = {"history": [[[[[[[[[[{}]]]]]]]]]]}
    (small_history / AURA_CONFIG).write_text(json.dumps(cfg))
    deep = copy_adapter(tiny.adapters["alpha"], tmp_path / "deep")
    (deep / AURA_CONFIG).write_text("[" * 100_000 + "]" * 100_000)
    deep_lora = copy_adapter(tiny.adapters["alpha"], tmp_path / "deep-lora")
    (deep_lora / LORA_CONFIG).write_text('{"r": 8, "x": ' + "[" * 50_000 + "]" * 50_000 + "}")
    rehash(deep_lora)  # adapter_config.json is checksummed: only the JSON limits may fail
    rss0 = _rss_mb(srv.proc.pid)
    for folder, code in [(wide, "bad_config"), (history, "bad_config"), (small_history, "bad_config"),
                         (deep, "bad_config"), (deep_lora, "bad_lora_config")]:
        r = _load(srv.url, "acme5", str(folder), headers=ADMIN)
        assert r.status_code == 422, (folder.name, r.text)
        assert r.json()["error"]["code"] == code, (folder.name, r.text)
    assert _rss_mb(srv.proc.pid) - rss0 < 150, "a refused config still cost memory"


# ---- 6. SSRF --------------------------------------------------------------------------------------

def test_redirects_to_loopback_or_plain_http_are_refused(srv, env, tiny):
    www = env["base"] / "www"
    www.mkdir(exist_ok=True)
    make_tarball(tiny.adapters["alpha"], www / "alpha.tar.gz")
    with file_server(www) as plain, \
            file_server(www, certfile=env["cert"], keyfile=env["key"]) as tls_loopback, \
            file_server(www, certfile=env["cert"], keyfile=env["key"], host=ALLOWED_HOST) as tls_allowed:
        assert _load(srv.url, "acme6", f"{tls_allowed}/alpha.tar.gz").status_code == 200  # the allowed host
        targets = [f"{plain}/alpha.tar.gz", f"{tls_loopback}/alpha.tar.gz",
                   f"{tls_loopback.replace('127.0.0.1', 'localhost')}/alpha.tar.gz"]
        for target in targets:
            with redirect_server(target, certfile=env["cert"], keyfile=env["key"], host=ALLOWED_HOST) as hop:
                r = _load(srv.url, "acme7", f"{hop}/alpha.tar.gz")
                assert r.status_code == 403 and r.json()["error"]["code"] == "source_forbidden", (target, r.text)
        r = _load(srv.url, "acme7", f"{tls_loopback}/alpha.tar.gz")  # directly
        assert r.status_code == 403, r.text


def test_fetch_errors_do_not_tell_which_ports_answer(srv, env, tiny):
    www = env["base"] / "www2"
    www.mkdir(exist_ok=True)
    with file_server(www, host=ALLOWED_HOST) as plain_http, \
            file_server(www, certfile=env["cert"], keyfile=env["key"], host=ALLOWED_HOST) as tls:
        closed = f"https://{ALLOWED_HOST}:9"
        open_not_tls = plain_http.replace("http://", "https://")
        texts = set()
        for base in (closed, open_not_tls, tls):
            r = _load(srv.url, "acme8", f"{base}/nothing.tar.gz")
            assert r.status_code == 502, r.text
            texts.add(re.sub(r"https://\S+?/nothing", "URL", r.json()["error"]["message"]))
    assert len(texts) == 1, texts


# ---- 4. metrics -----------------------------------------------------------------------------------

def test_metrics_need_a_key_and_hot_swaps_do_not_grow_the_lora_series(srv, tiny, env, speech):
    assert httpx.get(f"{srv.url}/metrics").status_code == 401
    assert httpx.get(f"{srv.url}/metrics", headers=ACME).status_code == 403
    assert httpx.get(f"{srv.url}/metrics", headers=ADMIN).status_code == 200
    for i in range(6):
        source = str(env["roots"] / "alpha") if i % 2 else str(tiny.adapters["beta"])
        assert _load(srv.url, "acme9", source, headers=ADMIN).status_code == 200
        _chat_tokens(srv.url, speech["sky"], "acme9", ACME)
        text = httpx.get(f"{srv.url}/metrics", headers=METRICS, timeout=10).text
    series = re.findall(r"^vllm:lora_requests_info\{.*$", text, re.M)
    assert 1 <= len(series) <= 1, series
