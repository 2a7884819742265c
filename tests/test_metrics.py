"""GET /metrics: the server's own families by adapter and tenant, plus vLLM's ``vllm:*`` families."""

from __future__ import annotations

import json
import re
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from launch import free_port, start_server, stop_server
from server.config import Settings

from server.frontend import FrontendTimings
from server.metrics import LATENCY_BUCKETS, MAX_LABEL_CHARS, OTHER, LabelCap, ServerMetrics
from server.serving import RequestRecord
from server.tenancy import hash_key


def scrape(url: str) -> dict[str, list]:
    r = httpx.get(f"{url}/metrics", timeout=10)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return {f.name: f.samples for f in text_string_to_metric_families(r.text)}


def value(families: dict, name: str, sample: str | None = None, **labels: str) -> float:
    sample = sample or name
    for s in families.get(name, []):
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    return 0.0


def test_metrics_count_a_request_by_adapter_and_tenant(server, speech):
    before = scrape(server.url)
    wav = speech["capital"].read_bytes()
    for stream in ("false", "true"):
        r = httpx.post(f"{server.url}/v1/audio/chat", files={"file": ("q.wav", wav)},
                       data={"adapter": "beta", "max_tokens": "6", "stream": stream}, timeout=120)
        assert r.status_code == 200
    bad = httpx.post(f"{server.url}/v1/audio/chat", files={"file": ("q.wav", wav)}, data={"adapter": "nope"})
    assert bad.status_code == 404
    after = scrape(server.url)
    # No API keys configured: every request is the open tenant's.
    tenant = next(s.labels["tenant"] for s in after["aura_requests"] if s.labels.get("adapter") == "beta")
    lab = {"adapter": "beta", "tenant": tenant}

    def delta(name: str, sample: str | None = None, **extra: str) -> float:
        return value(after, name, sample, **lab, **extra) - value(before, name, sample, **lab, **extra)

    assert delta("aura_requests", "aura_requests_total", code="200") == 2
    # a refused request (404) never claims a label slot of its own
    assert value(after, "aura_requests", "aura_requests_total", adapter=OTHER, code="404") >= 1
    assert not [x for x in after["aura_requests"] if x.labels.get("adapter") == "nope"]
    assert delta("aura_generations", "aura_generations_total", outcome="ok") == 2
    assert delta("aura_completion_tokens", "aura_completion_tokens_total") == 12
    assert delta("aura_prompt_tokens", "aura_prompt_tokens_total") > 12
    assert 2 * 1.5 < delta("aura_audio_seconds", "aura_audio_seconds_total") < 2 * 5
    for hist in ("aura_request_duration_seconds", "aura_time_to_first_token_seconds",
                 "aura_audio_decode_seconds", "aura_audio_features_seconds", "aura_audio_embed_seconds"):
        assert delta(hist, f"{hist}_count") == 2, hist
    assert delta("aura_inter_token_latency_seconds", "aura_inter_token_latency_seconds_count") == 2 * 5
    assert delta("aura_queue_wait_seconds", "aura_queue_wait_seconds_count", stage="admission") == 2
    assert delta("aura_queue_wait_seconds", "aura_queue_wait_seconds_count", stage="embed") == 2
    # TTFT is at least the audio work, and never more than the whole request
    ttft = delta("aura_time_to_first_token_seconds", "aura_time_to_first_token_seconds_sum")
    e2e = delta("aura_request_duration_seconds", "aura_request_duration_seconds_sum")
    assert 0 < ttft < e2e
    buckets = {s.labels["le"] for s in after["aura_time_to_first_token_seconds"] if s.name.endswith("_bucket")}
    assert {"0.0005", "80.0", "+Inf"} <= buckets
    assert value(after, "aura_requests_in_flight") == 0
    assert value(after, "aura_requests_queued") == 0
    assert value(after, "aura_engine_requests_unfinished") == 0


def test_vllm_families_are_on_the_same_endpoint(server, speech):
    httpx.post(f"{server.url}/v1/audio/chat", files={"file": ("q.wav", speech["sky"].read_bytes())},
               data={"adapter": "alpha", "max_tokens": "4"}, timeout=120)
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:lora_requests_info",
                 "vllm:time_to_first_token_seconds_count", "vllm:generation_tokens_total",
                 "process_resident_memory_bytes"):
        assert re.search(rf"^{re.escape(name)}[{{ ]", text, re.M), f"{name} missing"
    # vLLM names adapters '<name>@<lora id>' in its LoRA info gauge
    assert re.search(r'^vllm:lora_requests_info\{[^}]*running_lora_adapters="[^"]*alpha@', text, re.M) or \
        re.search(r'^vllm:lora_requests_info\{[^}]*max_lora="\d+"', text, re.M)


def test_label_values_are_bounded():
    cap = LabelCap(2)
    assert [cap(x) for x in ("a", "b", "c", "a", "d", None)] == ["a", "b", OTHER, "a", OTHER, OTHER]
    m = ServerMetrics(max_label_values=3)
    for i in range(50):
        m.observe(RequestRecord(adapter=f"adapter-{i}", status="ok", prompt_tokens=10, completion_tokens=3,
                                audio_seconds=1.0, ttft_s=0.05, e2e_s=0.1, itl_s=[0.01, 0.01],
                                frontend=FrontendTimings(0.001, 0.002, 0.003, 0.004, batch_size=1),
                                tenant=f"tenant-{i}", admission_wait_s=0.0))
        m.count_request(f"adapter-{i}", f"tenant-{i}", 200)
    fams = {f.name: f.samples for f in text_string_to_metric_families(m.render().decode())}
    adapters = {s.labels["adapter"] for s in fams["aura_request_duration_seconds"]}
    tenants = {s.labels["tenant"] for s in fams["aura_requests"]}
    assert adapters == {"adapter-0", "adapter-1", "adapter-2", OTHER}
    assert tenants == {"tenant-0", "tenant-1", "tenant-2", OTHER}
    assert value(fams, "aura_requests", "aura_requests_total", adapter=OTHER, tenant=OTHER, code="200") == 47
    assert LATENCY_BUCKETS[0] < 0.001 and LATENCY_BUCKETS[-1] >= 60


def test_hostile_model_names_neither_break_nor_flood_metrics(server, speech):
    """Lone surrogates once made /metrics answer 500 until restart; 200 KB names made it 5 MB and
    used up the label slots, so the next real adapter showed as 'other'."""
    body = b'{"model": "x\\ud800", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}'
    r = httpx.post(f"{server.url}/v1/chat/completions", content=body,
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code != 200
    wav = speech["sky"].read_bytes()
    for i in range(20):
        r = httpx.post(f"{server.url}/v1/audio/chat", files={"file": ("q.wav", wav)},
                       data={"adapter": "n" * 200_000 + str(i), "max_tokens": "2"}, timeout=60)
        assert r.status_code in (404, 422), r.status_code
    t0 = time.monotonic()
    r = httpx.get(f"{server.url}/metrics", timeout=10)
    assert r.status_code == 200 and time.monotonic() - t0 < 1.0
    assert len(r.content) < 1_000_000
    families = {f.name: f.samples for f in text_string_to_metric_families(r.text)}
    labels = {s.labels.get("adapter", "") for fam in families.values() for s in fam}
    assert all(len(v) <= MAX_LABEL_CHARS for v in labels)
    assert not [v for v in labels if v.startswith("nnnn") or "\ud800" in v]
    # a real adapter still gets its own label after the flood
    ok = httpx.post(f"{server.url}/v1/audio/chat", files={"file": ("q.wav", wav)},
                    data={"adapter": "alpha", "max_tokens": "2"}, timeout=60)
    assert ok.status_code == 200
    after = scrape(server.url)
    assert value(after, "aura_requests", "aura_requests_total", adapter="alpha", code="200") >= 1


def test_label_values_are_sanitised_and_refusals_claim_no_slot():
    cap = LabelCap(3)
    assert cap("x\ud800y") == "x?y"
    assert len(cap("a" * 100_000)) == MAX_LABEL_CHARS
    assert cap("probe", claim=False) == OTHER  # a refusal: the last slot stays free
    assert cap("real") == "real"
    assert cap("real", claim=False) == "real"  # values already seen keep their label
    m = ServerMetrics(max_label_values=4)
    for i in range(30):
        m.count_request(f"probe-{i}", "acme", 403)
        m.count_request(f"probe-{i}", "acme", 404)
    m.count_request("alpha", "acme", 200)
    fams = {f.name: f.samples for f in text_string_to_metric_families(m.render().decode())}
    assert {s.labels["adapter"] for s in fams["aura_requests"]} == {OTHER, "alpha"}


def test_a_metrics_port_gets_metrics_alone_and_the_api_port_none(tiny, speech, tmp_path_factory):
    """``--metrics-port``: the scrape endpoint moves to a listener of its own (kept off the clients'
    network by the operator, so no key there); the API port no longer answers /metrics, and the
    metrics port answers nothing else."""
    home = tmp_path_factory.mktemp("metrics-port")
    cfg = home / "aura.yaml"
    cfg.write_text(json.dumps({
        "admin_keys": [hash_key("admin-key")],
        "tenants": {"acme": {"keys": [hash_key("acme-key")], "adapters": ["alpha"], "default_adapter": "alpha"}},
        "adapters": [{"name": "alpha", "source": str(tiny.adapters["alpha"])}],
    }))
    metrics_port = free_port()
    args = ["--model", str(tiny.llm), "--dtype", "float32", "--max-num-seqs", "8", "--max-model-len", "1024",
            "--config", str(cfg), "--metrics-port", str(metrics_port)]
    srv = start_server(args, home, home / "server.log")
    admin = {"Authorization": "Bearer admin-key"}
    murl = f"http://127.0.0.1:{metrics_port}"
    try:
        r = httpx.post(f"{srv.url}/v1/audio/chat", files={"file": ("q.wav", speech["capital"].read_bytes())},
                       data={"max_tokens": "4"}, headers={"Authorization": "Bearer acme-key"}, timeout=120)
        assert r.status_code == 200, r.text
        families = scrape(murl)
        assert value(families, "aura_requests", "aura_requests_total", adapter="alpha", tenant="acme", code="200") == 1
        assert "vllm:num_requests_running" in families
        r = httpx.get(f"{srv.url}/metrics", headers=admin)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        for path in ("/health", "/ready", "/v1/models", "/docs"):
            assert httpx.get(f"{murl}{path}", headers=admin).status_code == 404, path
        assert httpx.get(f"{srv.url}/health").status_code == 200
    finally:
        stop_server(srv)


def test_the_metrics_port_must_differ_from_the_api_port():
    with pytest.raises(ValidationError, match="metrics_port 8000 is the API port"):
        Settings(port=8000, metrics_port=8000)
