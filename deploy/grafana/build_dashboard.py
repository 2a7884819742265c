"""Writes deploy/grafana/aura-serve.json: the AuRA serve dashboard (run after editing PANELS).

Why a generator: a Grafana dashboard is ~1,000 lines of JSON whose only content is the panel
list below; keeping the list here makes a review of a PromQL change one line, and the test
(tests/test_deploy.py) checks that every expression names only metrics the server exports.
"""

from __future__ import annotations

import json
from pathlib import Path

SEL = 'adapter=~"$adapter", tenant=~"$tenant", replica=~"$replica"'
ENG = 'replica=~"$replica"'


def q(quantile: float, metric: str, by: str = "adapter") -> str:
    return f'histogram_quantile({quantile}, sum by (le, {by}) (rate({metric}_bucket{{{SEL}}}[$__rate_interval])))'


# (title, unit, [(legend, expr)], width)
PANELS: list[tuple[str, str, list[tuple[str, str]], int]] = [
    ("TTFT p50 / p99 by adapter", "s", [
        ("p50 {{adapter}}", q(0.5, "aura_time_to_first_token_seconds")),
        ("p99 {{adapter}}", q(0.99, "aura_time_to_first_token_seconds"))], 12),
    ("TTFT p99 by tenant", "s", [("{{tenant}}", q(0.99, "aura_time_to_first_token_seconds", "tenant"))], 12),
    ("Inter-token latency p50 / p99", "s", [
        ("p50 {{adapter}}", q(0.5, "aura_inter_token_latency_seconds")),
        ("p99 {{adapter}}", q(0.99, "aura_inter_token_latency_seconds"))], 12),
    ("Queue wait p99 by stage", "s", [("{{stage}}", q(0.99, "aura_queue_wait_seconds", "stage"))], 12),
    ("Requests/s by status", "reqps", [
        ("{{code}}", f'sum by (code) (rate(aura_requests_total{{{SEL}}}[$__rate_interval]))')], 8),
    ("429 rate by tenant (backpressure)", "reqps", [
        ("{{tenant}}", f'sum by (tenant) (rate(aura_requests_total{{code="429", {SEL}}}[$__rate_interval]))')], 8),
    ("5xx share", "percentunit", [
        ("5xx", f'sum(rate(aura_requests_total{{code=~"5..", {SEL}}}[$__rate_interval])) / '
                f'clamp_min(sum(rate(aura_requests_total{{{SEL}}}[$__rate_interval])), 1e-9)')], 8),
    ("End-to-end latency p99", "s", [("{{adapter}}", q(0.99, "aura_request_duration_seconds"))], 12),
    ("Audio front end p99", "s", [
        ("decode", q(0.99, "aura_audio_decode_seconds", "replica")),
        ("features", q(0.99, "aura_audio_features_seconds", "replica")),
        ("audio layer", q(0.99, "aura_audio_embed_seconds", "replica"))], 12),
    ("Pipeline: in flight / queued", "short", [
        ("in flight {{replica}}", f"aura_requests_in_flight{{{ENG}}}"),
        ("queued {{replica}}", f"aura_requests_queued{{{ENG}}}"),
        ("engine unfinished {{replica}}", f"aura_engine_requests_unfinished{{{ENG}}}")], 12),
    ("vLLM: running / waiting", "short", [
        ("running {{replica}}", f"vllm:num_requests_running{{{ENG}}}"),
        ("waiting {{replica}}", f"vllm:num_requests_waiting{{{ENG}}}")], 12),
    ("vLLM: KV-cache use", "percentunit", [("{{replica}}", f"vllm:kv_cache_usage_perc{{{ENG}}}")], 8),
    ("vLLM: prefix-cache hit rate", "percentunit", [
        ("{{replica}}", f"sum by (replica) (rate(vllm:prefix_cache_hits_total{{{ENG}}}[$__rate_interval])) / "
                        f"clamp_min(sum by (replica) (rate(vllm:prefix_cache_queries_total{{{ENG}}}[$__rate_interval])), 1e-9)")], 8),
    ("Tokens/s", "short", [
        ("completion {{adapter}}", f'sum by (adapter) (rate(aura_completion_tokens_total{{{SEL}}}[$__rate_interval]))'),
        ("prompt {{adapter}}", f'sum by (adapter) (rate(aura_prompt_tokens_total{{{SEL}}}[$__rate_interval]))')], 8),
    ("Audio seconds/s by tenant", "short", [
        ("{{tenant}}", f'sum by (tenant) (rate(aura_audio_seconds_total{{{SEL}}}[$__rate_interval]))')], 12),
    ("Adapters resident in the engine (LoRA affinity)", "short", [
        ("{{replica}}: {{running_lora_adapters}}", f"aura_lora_requests_info{{{ENG}}}")], 12),
]


def panel(i: int, x: int, y: int, title: str, unit: str, targets: list[tuple[str, str]], w: int) -> dict:
    return {
        "id": i + 1, "type": "timeseries", "title": title, "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": w, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
        "targets": [{"refId": chr(65 + j), "expr": expr, "legendFormat": legend}
                    for j, (legend, expr) in enumerate(targets)],
    }


def variable(name: str, query: str) -> dict:
    return {"name": name, "type": "query", "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "query": {"query": query, "refId": name}, "definition": query, "includeAll": True, "multi": True,
            "allValue": ".*", "current": {"text": "All", "value": "$__all"}, "refresh": 2}


def build() -> dict:
    panels, x, y = [], 0, 0
    for i, (title, unit, targets, w) in enumerate(PANELS):
        if x + w > 24:
            x, y = 0, y + 8
        panels.append(panel(i, x, y, title, unit, targets, w))
        x += w
    return {
        "title": "AuRA serve", "uid": "aura-serve", "schemaVersion": 39, "version": 1, "editable": True,
        "tags": ["aura", "vllm", "speech"], "time": {"from": "now-1h", "to": "now"}, "refresh": "30s",
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus", "current": {}},
            variable("replica", "label_values(aura_requests_in_flight, replica)"),
            variable("adapter", "label_values(aura_requests_total, adapter)"),
            variable("tenant", "label_values(aura_requests_total, tenant)"),
        ]},
        "panels": panels,
    }


if __name__ == "__main__":
    out = Path(__file__).with_name("aura-serve.json")
    out.write_text(json.dumps(build(), indent=2) + "\n")
    print(f"wrote {out} ({len(PANELS)} panels)")
