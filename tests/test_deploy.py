"""The Helm chart and the Grafana dashboard, checked against real schemas and a real server.

The chart is rendered by Helm itself (the Helm library inside the ``helm-python-sdk`` wheel,
offline), every Kubernetes object is validated against the Kubernetes JSON schemas shipped in
``kubernetes-validate``, the InferencePool against the Inference Extension's v1 schema
(tests/schemas/inferencepool-v1.json), and every metric the chart's endpoint picker or the
dashboard names is looked up on a running ``aura serve``'s ``/metrics``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import jsonschema
import kubernetes_validate
import pytest
import yaml
from helm_python.chart import Chart, lint
from helm_python.errors import HelmRenderError, HelmValuesError

from server.lora_info import public_names

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "aura-serve"
DASHBOARD = ROOT / "deploy" / "grafana" / "aura-serve.json"
POOL_SCHEMA = json.loads((Path(__file__).parent / "schemas" / "inferencepool-v1.json").read_text())
K8S_VERSION = kubernetes_validate.latest_version()

EVERYTHING = {
    "target": "gpu",
    "server": {"model": "/models/llm", "env": {"AURA_MAX_LORAS": "8"}},
    "auth": {"existingSecret": "aura-keys"},
    "adapters": {"preload": {"support-en": "s3://adapters/support-en/", "local": "/adapters/local"},
                 "default": "support-en",
                 "s3": {"credentialsSecret": "s3-creds", "region": "eu-west-1", "endpointUrl": "https://minio:9000"},
                 "pvc": {"enabled": True, "existingClaim": "adapters"}},
    "modelVolume": {"enabled": True, "existingClaim": "models"},
    "serviceMonitor": {"enabled": True, "bearerTokenSecret": {"name": "metrics-key", "key": "token"}},
    "inferencePool": {"enabled": True, "httpRoute": {"enabled": True, "gatewayName": "inference-gateway"}},
}


def render(values: dict | None = None) -> list[dict]:
    with Chart.load(str(CHART)) as chart:
        manifests = chart.render(values=values or {}, name="demo", namespace="ml")
    docs = []
    for path, text in manifests.items():
        if path.endswith(".txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def by_kind(docs: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for d in docs:
        out.setdefault(d["kind"], []).append(d)
    return out


def exported_names(text: str) -> set[str]:
    """Sample names a scrape can contain, from the ``# TYPE`` lines (even families with no samples yet)."""
    names: set[str] = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        names.add(name)
        if kind == "counter":
            names.add(f"{name}_total")
        elif kind == "histogram":
            names.update(f"{name}{s}" for s in ("_bucket", "_sum", "_count"))
    return names


def test_the_chart_lints_without_errors():
    for values in ({}, EVERYTHING):
        assert lint(str(CHART), values)["errors"] == []


@pytest.mark.parametrize("values", [{}, EVERYTHING], ids=["defaults", "every-option"])
def test_every_kubernetes_object_matches_the_kubernetes_schema(values):
    docs = render(values)
    core = [d for d in docs if not d["apiVersion"].startswith(("inference.", "monitoring.coreos.com", "gateway."))]
    assert {d["kind"] for d in core} >= {"Deployment", "Service", "PodDisruptionBudget"}
    for d in core:
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)


def test_the_deployment_probes_health_and_ready_and_outlasts_the_drain():
    values = {"server": {"drainTimeoutSeconds": 45, "preStopSleepSeconds": 7}}
    (dep,) = by_kind(render(values))["Deployment"]
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["startupProbe"]["httpGet"]["path"] == "/health"
    assert c["lifecycle"]["preStop"]["sleep"]["seconds"] == 7
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["AURA_DRAIN_TIMEOUT_S"] == "45"
    # Kubernetes kills the pod after the grace period, counted from the start of preStop.
    assert pod["terminationGracePeriodSeconds"] > 7 + 45
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_every_option_wires_secrets_volumes_and_gpus():
    kinds = by_kind(render(EVERYTHING))
    dep = next(d for d in kinds["Deployment"] if d["metadata"]["name"] == "demo-aura-serve")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    args = c["args"]
    assert args[args.index("--config") + 1] == "/etc/aura/aura.yaml"
    assert args[args.index("--model") + 1] == "/models/llm"
    assert "support-en=s3://adapters/support-en/" in args and "local=/adapters/local" in args
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"secretRef": {"name": "s3-creds"}} in c["envFrom"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert json.loads(env["AURA_ADAPTER_ROOTS"]) == ["/adapters"]
    assert env["AURA_MAX_LORAS"] == "8" and env["AWS_ENDPOINT_URL"] == "https://minio:9000"
    vols = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert vols["aura-config"]["secret"]["secretName"] == "aura-keys"
    assert vols["adapters"]["persistentVolumeClaim"] == {"claimName": "adapters", "readOnly": True}
    (sm,) = kinds["ServiceMonitor"]
    (svc,) = [s for s in kinds["Service"] if s["metadata"]["name"] == dep["metadata"]["name"]]
    assert sm["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"]
    assert sm["spec"]["endpoints"][0]["path"] == "/metrics"
    assert sm["spec"]["selector"]["matchLabels"] == svc["spec"]["selector"]


def test_the_inference_pool_matches_its_schema_and_points_at_the_pods_and_the_picker():
    kinds = by_kind(render(EVERYTHING))
    (pool,) = kinds["InferencePool"]
    jsonschema.validate(pool, POOL_SCHEMA)
    model_dep = next(d for d in kinds["Deployment"] if d["metadata"]["name"] == "demo-aura-serve")
    pod_labels = model_dep["spec"]["template"]["metadata"]["labels"]
    assert pool["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    port = model_dep["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"]
    assert pool["spec"]["targetPorts"] == [{"number": port}]
    numbers = [p["number"] for p in pool["spec"]["targetPorts"]]
    assert len(numbers) == len(set(numbers))  # the CRD's CEL rule: unique port numbers
    ref = pool["spec"]["endpointPickerRef"]
    epp_svc = next(s for s in kinds["Service"] if s["metadata"]["name"] == ref["name"])
    assert ref["port"]["number"] in [p["port"] for p in epp_svc["spec"]["ports"]]
    epp_dep = next(d for d in kinds["Deployment"] if d["metadata"]["name"] == ref["name"])
    assert epp_svc["spec"]["selector"].items() <= epp_dep["spec"]["template"]["metadata"]["labels"].items()
    (route,) = kinds["HTTPRoute"]
    backend = route["spec"]["rules"][0]["backendRefs"][0]
    assert (backend["kind"], backend["name"]) == ("InferencePool", pool["metadata"]["name"])


def test_the_endpoint_picker_scores_lora_affinity_with_a_consistent_config():
    kinds = by_kind(render(EVERYTHING))
    (cm,) = kinds["ConfigMap"]
    config = yaml.safe_load(cm["data"]["epp-config.yaml"])
    assert config["kind"] == "EndpointPickerConfig"
    declared = {p.get("name", p["type"]) for p in config["plugins"]}
    (profile,) = config["schedulingProfiles"]
    used = {p["pluginRef"] for p in profile["plugins"]}
    assert used <= declared
    assert "lora-affinity-scorer" in used and "max-score-picker" in used
    epp = next(d for d in kinds["Deployment"] if d["metadata"]["name"].endswith("-epp"))
    args = epp["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--pool-name") + 1] == kinds["InferencePool"][0]["metadata"]["name"]
    mount = epp["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][0]["mountPath"]
    assert args[args.index("--config-file") + 1] == f"{mount}/epp-config.yaml"


@pytest.mark.parametrize("values, message", [
    ({"target": "tpu"}, "target"),
    ({"adapters": {"pvc": {"enabled": True}}}, "existingClaim"),
    ({"server": {"env": {"NOT_AURA": "1"}}}, "NOT_AURA"),
    ({"inferencePool": {"enabled": True, "httpRoute": {"enabled": True}}}, "gatewayName"),
])
def test_bad_values_are_refused_with_a_message_naming_them(values, message):
    with pytest.raises((HelmValuesError, HelmRenderError)) as e:
        render(values)
    assert message in str(e.value)


def test_every_metric_the_picker_and_the_dashboard_read_is_exported_by_the_server(server):
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    exported = exported_names(text)
    picker_metrics = yaml.safe_load((CHART / "values.yaml").read_text())["inferencePool"]["epp"]["metrics"]
    for name in picker_metrics.values():
        assert name in exported, f"the endpoint picker reads {name}, which /metrics does not export"
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if isinstance(v.get("query"), dict)]
    assert len(exprs) >= 16
    named = {m for e in exprs for m in re.findall(r"\b((?:aura_|vllm:)[A-Za-z0-9_:]+)", e)}
    missing = sorted(named - exported)
    assert not missing, f"dashboard queries name metrics the server does not export: {missing}"
    assert {"aura_time_to_first_token_seconds_bucket", "aura_inter_token_latency_seconds_bucket",
            "aura_queue_wait_seconds_bucket", "aura_requests_total"} <= named


def test_the_dashboard_file_is_what_its_generator_writes():
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_dashboard", DASHBOARD.with_name("build_dashboard.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert json.loads(DASHBOARD.read_text()) == module.build()


def test_public_lora_names_drop_version_ids_and_duplicates():
    assert public_names("support-en@3,beta@4,support-en@5") == "support-en,beta"
    assert public_names("") == ""
    assert public_names("a.b@c@12") == "a.b@c"


def test_lora_residency_names_adapters_as_clients_send_them(server, speech):
    """While a stream runs on alpha, the affinity gauge lists "alpha" (not vLLM's "alpha@<id>")."""
    wav = speech["sky"].read_bytes()
    with httpx.stream("POST", f"{server.url}/v1/audio/chat", files={"file": ("q.wav", wav)},
                      data={"adapter": "alpha", "max_tokens": "400", "stream": "true"}, timeout=300) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
    rows = re.findall(r'^aura_lora_requests_info\{([^}]*)\} ', text, re.M)
    assert len(rows) == 1, text[-2000:]
    labels = dict(re.findall(r'(\w+)="([^"]*)"', rows[0]))
    assert "alpha" in labels["running_lora_adapters"].split(",")
    assert "@" not in labels["running_lora_adapters"] + labels["waiting_lora_adapters"]
    assert int(labels["max_lora"]) >= 1
