"""``aura_lora_requests_info``: vLLM's LoRA residency gauge, with adapter names as clients send them.

Why: the Gateway API Inference Extension's endpoint picker scores replicas by LoRA affinity from
a gauge shaped like ``vllm:lora_requests_info`` (labels ``max_lora``, ``running_lora_adapters``,
``waiting_lora_adapters``; value = last update time) and matches those names against the
request's ``model``. vLLM labels a LoRA by its ``lora_name``, which AuRA serve sets to
``<adapter>@<version id>`` (vLLM keys LoRA requests by name, and two versions of one adapter are
resident during a hot swap), so the picker would never find ``support-en`` in ``support-en@3``.
This collector re-exports the latest vLLM sample as one series with the version suffix dropped.
The picker is pointed at it with ``--lora-info-metric=aura_lora_requests_info`` (see the Helm chart).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

SOURCE = "vllm:lora_requests_info"
NAME = "aura_lora_requests_info"
LABELS = ("max_lora", "running_lora_adapters", "waiting_lora_adapters")


def public_names(label: str) -> str:
    """``"a@3,b@4,a@5"`` -> ``"a,b"``: adapter names in first-seen order, version ids dropped."""
    seen: dict[str, None] = {}
    for item in label.split(","):
        name = item.strip().rsplit("@", 1)[0]
        if name:
            seen.setdefault(name, None)
    return ",".join(seen)


class LoraInfoCollector(Collector):
    """Reads vLLM's gauge from ``source`` at scrape time, so it is never staler than vLLM's own."""

    def __init__(self, source: CollectorRegistry = REGISTRY) -> None:
        self.source = source

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(NAME, self._doc(), labels=LABELS)

    @staticmethod
    def _doc() -> str:
        return "LoRA adapters running/waiting in the engine (names as in `model`); value: last update time."

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(NAME, self._doc(), labels=LABELS)
        latest = None
        for metric in self.source.collect():
            if metric.name != SOURCE:
                continue
            for sample in metric.samples:
                if latest is None or sample.value > latest.value:
                    latest = sample
        if latest is not None:
            family.add_metric([latest.labels.get("max_lora", ""),
                               public_names(latest.labels.get("running_lora_adapters", "")),
                               public_names(latest.labels.get("waiting_lora_adapters", ""))], latest.value)
        yield family
