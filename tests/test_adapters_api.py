"""Adapters as a product, end to end against one real server started with ``--config``:
API keys and tenants (401/403), /v1/adapters management, hot swap under a running stream,
validation and fetch failures over HTTP (nothing serving changes), S3 (moto server) and HTTP
archive sources, and unloading that really frees the engine's LoRA."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from adapter_helpers import (
    copy_adapter, edit_json, file_server, make_tarball, moto_s3, s3_client, sha256_of, upload_adapter,
)
from adapters.adapter import LORA_CONFIG
from launch import start_server, stop_server
from server.tenancy import hash_key
from sse import parse_sse

ADMIN = {"Authorization": "Bearer admin-key"}
ACME = {"Authorization": "Bearer acme-key"}
GLOBEX = {"Authorization": "Bearer globex-plain-key"}
OPS = {"Authorization": "Bearer ops-key"}


@pytest.fixture(scope="module")
def s3env():
    with moto_s3() as env:
        yield env


@pytest.fixture(scope="module")
def www(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("www")
    make_tarball(tiny.adapters["alpha"], root / "alpha.tar.gz")
    with file_server(root) as url:
        yield url, root


@pytest.fixture(scope="module")
def srv(tiny, s3env, tmp_path_factory):
    home = tmp_path_factory.mktemp("tenant-home")
    config = {
        "admin_keys": [hash_key("admin-key")],
        "tenants": {
            "acme": {"keys": [hash_key("acme-key")], "adapters": ["alpha", "swap", "s3ad", "httpad", "gone"],
                     "default_adapter": "alpha"},
            "globex": {"keys": ["globex-plain-key"], "adapters": ["beta"], "default_adapter": "beta"},
            "ops": {"keys": [hash_key("ops-key")], "adapters": ["opsad"], "manage": True},
        },
        "adapters": [{"name": "alpha", "source": str(tiny.adapters["alpha"]), "pin": True},
                     {"name": "beta", "source": tiny.adapters["beta"].as_uri()}],
    }
    cfg = home / "aura.yaml"
    cfg.write_text(json.dumps(config))  # JSON is YAML
    args = ["--model", str(tiny.llm), "--dtype", "float32", "--max-num-seqs", "32", "--max-model-len", "1024",
            "--config", str(cfg)]
    # AURA_ADAPTER_ROOTS: tenants with manage (ops) may load local folders only under these
    env = {**s3env, "AURA_ADAPTER_ALLOW_HTTP": "1", "AURA_ADAPTER_ROOTS": json.dumps([str(tiny.root)])}
    server = start_server(args, home, home / "server.log", env=env)
    yield server
    stop_server(server)


def _tokens(url: str, wav, adapter: str | None, headers: dict, max_tokens: int = 12) -> list[int]:
    data = {"stream": "true", "max_tokens": str(max_tokens), "return_token_ids": "true"}
    if adapter:
        data["adapter"] = adapter
    with open(wav, "rb") as f, httpx.stream("POST", f"{url}/v1/audio/chat", files={"file": ("q.wav", f)},
                                           data=data, headers=headers, timeout=120) as r:
        assert r.status_code == 200, r.read()
        s = parse_sse(list(r.iter_lines()))
    assert s.done and s.error is None
    return s.token_ids


def _load(url: str, name: str, source: str, headers=ADMIN, **extra) -> httpx.Response:
    return httpx.post(f"{url}/v1/adapters", json={"name": name, "source": source, **extra}, headers=headers,
                      timeout=120)


def _chat(url: str, wav, headers: dict, **fields) -> httpx.Response:
    with open(wav, "rb") as f:
        return httpx.post(f"{url}/v1/audio/chat", files={"file": ("q.wav", f)},
                          data={"max_tokens": "2", **fields}, headers=headers, timeout=120)


# ---- keys and tenants ---------------------------------------------------------------------------

def test_no_key_or_bad_key_is_401_but_probes_stay_open_and_metrics_need_admin(srv, speech):
    for method, path in [("GET", "/v1/models"), ("GET", "/v1/adapters"), ("GET", "/v1/adapters/alpha"),
                         ("POST", "/v1/adapters"), ("POST", "/v1/chat/completions")]:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": hash_key("acme-key")}):
            r = httpx.request(method, srv.url + path, headers=headers, json={}, timeout=30)
            assert r.status_code == 401, (method, path, headers, r.text)
            assert r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{srv.url}/health").status_code == 200
    assert httpx.get(f"{srv.url}/ready").status_code == 200
    # /metrics names every tenant and adapter: with keys configured it needs an admin key
    assert httpx.get(f"{srv.url}/metrics").status_code == 401
    assert httpx.get(f"{srv.url}/metrics", headers=ACME).status_code == 403
    assert httpx.get(f"{srv.url}/metrics", headers=ADMIN).status_code == 200
    assert "tenancy configured" in srv.log.read_text()


def test_tenants_see_and_use_only_their_adapters(srv, speech):
    acme = {c["id"] for c in httpx.get(f"{srv.url}/v1/models", headers=ACME).json()["data"] if c["kind"] == "adapter"}
    assert "alpha" in acme and "beta" not in acme
    assert acme <= {"alpha", "swap", "s3ad", "httpad", "gone"}
    globex = httpx.get(f"{srv.url}/v1/models", headers=GLOBEX).json()["data"]
    assert {c["id"] for c in globex if c["kind"] == "adapter"} == {"beta"}
    assert [c["default"] for c in globex if c["id"] == "beta"] == [True]
    admin = {c["id"] for c in httpx.get(f"{srv.url}/v1/models", headers=ADMIN).json()["data"]}
    assert {"alpha", "beta"} <= admin

    # a tenant's default applies when the request names no adapter
    assert _chat(srv.url, speech["sky"], ACME).json()["model"] == "alpha"
    assert _chat(srv.url, speech["sky"], GLOBEX).json()["model"] == "beta"
    assert _chat(srv.url, speech["sky"], GLOBEX, adapter="beta").status_code == 200


def test_403_does_not_reveal_whether_an_adapter_exists(srv, speech):
    bodies = []
    for name in ("beta", "no-such-adapter"):  # beta exists (globex's), the other does not
        r = _chat(srv.url, speech["sky"], ACME, adapter=name)
        assert r.status_code == 403, r.text
        bodies.append(json.dumps(r.json()).replace(name, "NAME"))
        g = httpx.get(f"{srv.url}/v1/adapters/{name}", headers=ACME)
        assert g.status_code == 403
        bodies.append(json.dumps(g.json()).replace(name, "NAME"))
    assert bodies[0] == bodies[2] and bodies[1] == bodies[3]
    # an adapter the tenant may use but that is not loaded is an honest 404
    assert _chat(srv.url, speech["sky"], ACME, adapter="gone").status_code == 404


def test_only_admins_and_managing_tenants_manage(srv, tiny):
    src = str(tiny.adapters["alpha"])
    r = _load(srv.url, "swap", src, headers=ACME)
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_required"
    assert httpx.delete(f"{srv.url}/v1/adapters/alpha", headers=ACME).status_code == 403
    assert httpx.delete(f"{srv.url}/v1/adapters/beta", headers=ACME).status_code == 403
    assert _load(srv.url, "alpha", src, headers=OPS).status_code == 403  # not one of ops' adapters
    r = _load(srv.url, "opsad", src, headers=OPS)
    assert r.status_code == 200, r.text
    assert [a["name"] for a in httpx.get(f"{srv.url}/v1/adapters", headers=OPS).json()["data"]] == ["opsad"]
    assert httpx.delete(f"{srv.url}/v1/adapters/opsad", headers=OPS).status_code == 200
    assert _load(srv.url, "default", src).status_code == 400  # reserved


def test_adapter_listing_has_the_details(srv):
    body = httpx.get(f"{srv.url}/v1/adapters", headers=ADMIN).json()
    cards = {a["name"]: a for a in body["data"]}
    alpha = cards["alpha"]
    assert alpha["pinned"] is True and cards["beta"]["pinned"] is False
    assert alpha["rank"] == 8 and alpha["status"] == "serving" and alpha["resident"] == "engine"
    assert alpha["trained"] is False and alpha["base_model"] and alpha["source"]
    assert alpha["lora_id"] in body["engine_lora_ids"]
    acme = httpx.get(f"{srv.url}/v1/adapters", headers=ACME).json()
    assert acme["engine_lora_ids"] is None and "beta" not in {a["name"] for a in acme["data"]}


# ---- hot swap -----------------------------------------------------------------------------------

def test_hot_swap_running_stream_finishes_on_its_version(srv, tiny, speech):
    clip = speech["capital"]
    long_n = 700
    v1 = _load(srv.url, "swap", str(tiny.adapters["alpha"])).json()
    assert v1["version"] == 1 and v1["previous_version"] is None
    a_long = _tokens(srv.url, clip, "swap", ACME, max_tokens=long_n)
    a_short = a_long[:12]
    b_short = _tokens(srv.url, clip, "beta", GLOBEX)
    assert a_short != b_short, "the two adapters must answer differently for this test to mean anything"

    data = {"adapter": "swap", "stream": "true", "max_tokens": str(long_n), "return_token_ids": "true"}
    with open(clip, "rb") as f, httpx.stream("POST", f"{srv.url}/v1/audio/chat", files={"file": ("q.wav", f)},
                                            data=data, headers=ACME, timeout=300) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        head = []
        for line in lines:  # wait until the stream is really generating
            head.append(line)
            if '"token_ids":[' in line:
                break
        v2 = _load(srv.url, "swap", str(tiny.adapters["beta"]))
        assert v2.status_code == 200, v2.text
        v2 = v2.json()
        assert v2["version"] == 2 and v2["previous_version"] == 1 and v2["lora_id"] != v1["lora_id"]
        assert [(d["version"], d["active_requests"], d["status"]) for d in v2["draining"]] == [(1, 1, "draining")]
        assert _tokens(srv.url, clip, "swap", ACME) == b_short  # new requests: the new version
        rest = list(lines)
    s = parse_sse(head + rest)
    assert s.done and s.error is None
    assert s.token_ids == a_long  # the running stream: the old version, LoRA and audio layer alike

    listing = httpx.get(f"{srv.url}/v1/adapters", headers=ADMIN).json()
    swap = next(a for a in listing["data"] if a["name"] == "swap")
    assert swap["version"] == 2 and swap["draining"] == []
    assert v1["lora_id"] not in listing["engine_lora_ids"]  # the old version left the engine


def test_rejected_loads_leave_the_old_version_serving(srv, tiny, speech, tmp_path):
    _load(srv.url, "swap", str(tiny.adapters["beta"]))
    before = httpx.get(f"{srv.url}/v1/adapters/swap", headers=ADMIN).json()
    expected = _tokens(srv.url, speech["sky"], "swap", ACME)

    rank = copy_adapter(tiny.adapters["alpha"], tmp_path / "rank")
    edit_json(rank, LORA_CONFIG, r=128)
    pickled = copy_adapter(tiny.adapters["alpha"], tmp_path / "pickled")
    (pickled / "optimizer.pt").write_bytes(b"\x80\x04.")
    corrupt = copy_adapter(tiny.adapters["alpha"], tmp_path / "corrupt")
    (corrupt / "adapter_model.safetensors").write_bytes(b"\0" * 100)
    cases = [
        (str(rank), {}, 422, "rank_too_large", "adapter_config.json"),
        (str(pickled), {}, 422, "pickle_weights", "optimizer.pt"),
        (str(corrupt), {}, 422, "checksum_mismatch", "adapter_model.safetensors"),
        (str(tmp_path / "missing"), {}, 422, "source_not_found", None),
        (str(tiny.adapters["alpha"]), {"sha256": "0" * 64}, 422, "source_checksum_mismatch", None),
        ("s3://adapters/not/there/", {}, 422, "source_not_found", None),
        ("ftp://example.com/a.tar.gz", {}, 400, "source_bad_source", None),
    ]
    for source, extra, status, code, file in cases:
        r = _load(srv.url, "swap", source, **extra)
        assert r.status_code == status, (source, r.text)
        err = r.json()["error"]
        assert err["code"] == code, (source, err)
        if file:
            assert file in err["message"]
        after = httpx.get(f"{srv.url}/v1/adapters/swap", headers=ADMIN).json()
        assert (after["version"], after["lora_id"]) == (before["version"], before["lora_id"])
        assert _tokens(srv.url, speech["sky"], "swap", ACME) == expected
    bad_body = httpx.post(f"{srv.url}/v1/adapters", json={"name": "../x", "source": "y"}, headers=ADMIN)
    assert bad_body.status_code == 422


async def test_concurrent_loads_of_one_name_serialise(srv, tiny):
    async with httpx.AsyncClient(base_url=srv.url, headers=ADMIN, timeout=120) as c:
        rs = await asyncio.gather(*(c.post("/v1/adapters", json={"name": "conc", "source": str(tiny.adapters[k])})
                                    for k in ("alpha", "beta", "alpha")))
        assert [r.status_code for r in rs] == [200, 200, 200]
        versions = sorted(r.json()["version"] for r in rs)
        final = (await c.get("/v1/adapters/conc")).json()
        assert final["version"] == versions[-1] and versions == list(range(versions[0], versions[0] + 3))
        assert (await c.delete("/v1/adapters/conc")).status_code == 200


# ---- sources and unload -----------------------------------------------------------------------------

def test_s3_and_http_sources_then_unload_frees_the_engine(srv, tiny, speech, s3env, www):
    client = s3_client(s3env)
    client.create_bucket(Bucket="adapters")
    upload_adapter(client, "adapters", "beta", tiny.adapters["beta"])
    r = _load(srv.url, "s3ad", "s3://adapters/beta/")
    assert r.status_code == 200, r.text
    assert _tokens(srv.url, speech["spider"], "s3ad", ACME) == _tokens(srv.url, speech["spider"], "beta", GLOBEX)

    url, root = www
    r = _load(srv.url, "httpad", f"{url}/alpha.tar.gz", sha256=sha256_of(root / "alpha.tar.gz"))
    assert r.status_code == 200, r.text
    httpad = r.json()
    assert httpad["source"].endswith("alpha.tar.gz")
    assert _tokens(srv.url, speech["spider"], "httpad", ACME) == _tokens(srv.url, speech["spider"], "alpha", ACME)

    before = httpx.get(f"{srv.url}/v1/adapters", headers=ADMIN).json()["engine_lora_ids"]
    assert httpad["lora_id"] in before
    d = httpx.delete(f"{srv.url}/v1/adapters/httpad", headers=ADMIN)
    assert d.status_code == 200 and d.json()["deleted"] is True
    after = httpx.get(f"{srv.url}/v1/adapters", headers=ADMIN).json()["engine_lora_ids"]
    assert httpad["lora_id"] not in after and set(after) == set(before) - {httpad["lora_id"]}
    assert _chat(srv.url, speech["sky"], ACME, adapter="httpad").status_code == 404
    assert httpx.delete(f"{srv.url}/v1/adapters/httpad", headers=ADMIN).status_code == 404


def test_realtime_and_transcriptions_use_the_same_keys_and_adapter_rules(srv, speech):
    """The realtime socket takes the key as a header or as the subprotocol browsers use; a tenant
    gets the same refusal for an adapter it may not use as for one that does not exist."""
    from websockets.sync.client import connect

    ws_url = srv.url.replace("http://", "ws://") + "/v1/realtime"
    with connect(ws_url, open_timeout=30) as ws:  # no key
        err = json.loads(ws.recv(timeout=30))
        assert err["type"] == "error" and err["error"]["code"] == "missing_api_key"
        with pytest.raises(Exception):
            ws.recv(timeout=10)
        assert ws.close_code == 1008
    refusals = []
    with connect(ws_url, subprotocols=["realtime", "openai-insecure-api-key.acme-key"], open_timeout=30) as ws:
        assert ws.subprotocol == "realtime"
        assert json.loads(ws.recv(timeout=30))["type"] == "session.created"
        for name in ("beta", "no-such-adapter"):
            ws.send(json.dumps({"type": "session.update", "session": {"model": name}}))
            err = json.loads(ws.recv(timeout=30))["error"]
            refusals.append({k: v.replace(name, "X") if isinstance(v, str) else v for k, v in err.items()})
        ws.send(json.dumps({"type": "session.update", "session": {"model": "alpha"}}))
        assert json.loads(ws.recv(timeout=30))["type"] == "session.updated"
    assert refusals[0] == refusals[1] and refusals[0]["code"] == "adapter_forbidden"
    with connect(ws_url, additional_headers={"Authorization": "Bearer globex-plain-key"}, open_timeout=30) as ws:
        assert json.loads(ws.recv(timeout=30))["type"] == "session.created"
    with open(speech["sky"], "rb") as f:
        r = httpx.post(f"{srv.url}/v1/audio/transcriptions", files={"file": ("q.wav", f)},
                       data={"model": "beta", "max_tokens": "2"}, headers=ACME, timeout=60)
    assert r.status_code == 403
    with open(speech["sky"], "rb") as f:
        r = httpx.post(f"{srv.url}/v1/audio/transcriptions", files={"file": ("q.wav", f)},
                       data={"max_tokens": "2"}, headers=ACME, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["output_tokens"] == 2
