"""The server's own Prometheus metrics, and the ASGI middleware that tags and counts requests.

Why a private registry: the server's families live in their own ``CollectorRegistry`` so two
apps in one process (tests) never collide, while vLLM's ``PrometheusStatLogger`` registers its
``vllm:*`` families in prometheus_client's default registry; ``GET /metrics`` renders both.

Label sets are bounded: the first ``max_label_values`` distinct adapters (and tenants) keep their
own label value, later ones are folded into ``"other"``, so a churn of hot-swapped adapter names
or many tenants cannot grow the series count without limit. Label values are sanitised (valid
UTF-8, printable, at most ``MAX_LABEL_CHARS``), and a refused request (401/403/404) never claims
a slot: a caller's made-up names cannot crowd out real adapters or break the exposition.

vLLM's ``vllm:lora_requests_info`` gauge gains one series per combination of running/waiting
LoRA names, and each hot swap is a new name (``<adapter>@<lora id>``); its value is the time
the combination was last seen. Before every scrape all but the newest series are removed — what
a reader of that gauge (the Gateway API endpoint picker) uses anyway — so swaps do not grow it.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import REGISTRY as DEFAULT_REGISTRY
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.engine.base import Engine
from server.logs import request_id_var
from server.lora_info import LoraInfoCollector

log = logging.getLogger("server.requests")

# Sub-millisecond (decode of a short clip, a queue hop) to tens of seconds (a long answer on CPU).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.175, 0.25, 0.5,
                   0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
# Inter-token gaps: a batched decode step is ~1-100 ms; stalls show up in the top buckets.
ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1,
               0.15, 0.25, 0.5, 1.0, 2.5, 5.0)

OTHER = "other"


MAX_LABEL_CHARS = 64
LORA_INFO = "vllm:lora_requests_info"
REFUSED = frozenset({401, 403, 404})


def sanitize_label(value: str) -> str:
    """Valid UTF-8 (lone surrogates become '?'), printable, at most ``MAX_LABEL_CHARS`` characters."""
    value = value[: MAX_LABEL_CHARS * 2].encode("utf-8", "replace").decode("utf-8")
    value = "".join(c if c.isprintable() else "?" for c in value)
    return value[:MAX_LABEL_CHARS]


class LabelCap:
    """The first ``limit`` distinct values keep their own label value; later ones read 'other'."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._seen: set[str] = set()

    def __call__(self, value: str | None, *, claim: bool = True) -> str:
        """``claim=False`` (refused requests): reuse a value already seen, never take a new slot."""
        value = sanitize_label(value) if value else "none"
        if value in self._seen:
            return value
        if claim and len(self._seen) < self.limit:
            self._seen.add(value)
            return value
        return OTHER


class ServerMetrics:
    """Histograms, counters and gauges of the serving path, labelled by adapter and tenant."""

    def __init__(self, max_label_values: int = 16) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.adapter_label = LabelCap(max_label_values)
        self.tenant_label = LabelCap(max_label_values)
        at = ["adapter", "tenant"]
        r = self.registry

        def hist(name: str, doc: str, buckets: tuple[float, ...] = LATENCY_BUCKETS,
                 extra: tuple[str, ...] = ()) -> Histogram:
            return Histogram(name, doc, [*at, *extra], buckets=buckets, registry=r)

        self.e2e = hist("aura_request_duration_seconds",
                        "Request received to last token (or error) for requests that reached the engine.")
        self.ttft = hist("aura_time_to_first_token_seconds",
                         "Request received (after admission) to the first generated token; includes audio work.")
        self.itl = hist("aura_inter_token_latency_seconds", "Gap between consecutive generated tokens.",
                        ITL_BUCKETS)
        self.queue_wait = hist("aura_queue_wait_seconds",
                               "Waiting: stage=admission (for a pipeline slot), stage=embed (for the audio-layer batch).",
                               extra=("stage",))
        self.decode = hist("aura_audio_decode_seconds", "Decoding + resampling the uploaded audio.")
        self.features = hist("aura_audio_features_seconds", "Log-mel features of the request's batch.")
        self.embed = hist("aura_audio_embed_seconds", "The adapter's audio embedding layer on the request's batch.")
        self.requests = Counter("aura_requests", "Chat requests answered, by HTTP status code.",
                                [*at, "code"], registry=r)
        self.generations = Counter(
            "aura_generations", "Engine generations by outcome: ok, aborted (client left), deadline, engine_dead.",
            [*at, "outcome"], registry=r)
        self.audio_seconds = Counter("aura_audio_seconds", "Seconds of input audio processed.", at, registry=r)
        self.prompt_tokens = Counter("aura_prompt_tokens", "Prompt tokens (text + audio positions).", at, registry=r)
        self.completion_tokens = Counter("aura_completion_tokens", "Generated tokens.", at, registry=r)
        self.in_flight = Gauge("aura_requests_in_flight", "Requests holding a pipeline slot (decode .. last token).",
                               registry=r)
        self.queued = Gauge("aura_requests_queued", "Requests waiting for a pipeline slot.", registry=r)
        self.engine_requests = Gauge("aura_engine_requests_unfinished",
                                     "Requests the engine holds (queued or running in vLLM).", registry=r)
        self.engine_lora_loads = Gauge(
            "aura_engine_lora_loads",
            "LoRA loads in the engine's workers: where=off_loop (read and packed in a worker thread, handed "
            "over ready) or where=in_loop (read inside the step loop, stalling every stream: host-cache misses).",
            ["where"], registry=r)
        self._engine_read: asyncio.Future[None] | None = None
        r.register(LoraInfoCollector())

    def bind(self, *, in_flight: Callable[[], float], queued: Callable[[], float],
             engine_requests: Callable[[], float]) -> None:
        """Gauges read live values at scrape time, so they can never drift from the truth."""
        self.in_flight.set_function(in_flight)
        self.queued.set_function(queued)
        self.engine_requests.set_function(engine_requests)

    def labels(self, adapter: str | None, tenant: str | None, *, claim: bool = True) -> tuple[str, str]:
        return self.adapter_label(adapter, claim=claim), self.tenant_label(tenant or "default", claim=claim)

    def count_request(self, adapter: str | None, tenant: str | None, code: int) -> None:
        self.requests.labels(*self.labels(adapter, tenant, claim=code not in REFUSED), str(code)).inc()

    def observe(self, record: Any) -> None:
        """A :class:`server.serving.RequestRecord` observer: one finished generation."""
        a, t = self.labels(record.adapter, getattr(record, "tenant", None))
        self.generations.labels(a, t, record.status).inc()
        self.e2e.labels(a, t).observe(record.e2e_s)
        if record.ttft_s is not None:
            self.ttft.labels(a, t).observe(record.ttft_s)
        itl = self.itl.labels(a, t)
        for gap in record.itl_s:
            itl.observe(gap)
        self.prompt_tokens.labels(a, t).inc(record.prompt_tokens)
        self.completion_tokens.labels(a, t).inc(record.completion_tokens)
        self.audio_seconds.labels(a, t).inc(record.audio_seconds)
        admission = getattr(record, "admission_wait_s", None)
        if admission is not None:
            self.queue_wait.labels(a, t, "admission").observe(admission)
        fe = record.frontend
        if fe is not None and fe.batch_size:  # batch_size 0: a text-only request, no audio work
            self.queue_wait.labels(a, t, "embed").observe(fe.queue_s)
            self.decode.labels(a, t).observe(fe.decode_s)
            self.features.labels(a, t).observe(fe.features_s)
            self.embed.labels(a, t).observe(fe.embed_s)

    async def refresh_engine(self, engine: Engine | None, wait_s: float = 0.05) -> None:
        """Read the engine's counters that live in its own processes before a scrape.

        One small RPC, answered between two engine steps; the scrape waits for it at most
        ``wait_s`` (a busy engine must not slow ``/metrics``) and otherwise shows the last values,
        updated when the answer arrives. At most one read is in flight.
        """
        if engine is None:
            return
        if self._engine_read is None or self._engine_read.done():
            self._engine_read = asyncio.ensure_future(self._read_engine(engine))
        await asyncio.wait({self._engine_read}, timeout=wait_s)

    async def _read_engine(self, engine: Engine) -> None:
        try:
            counts = await asyncio.wait_for(engine.lora_load_counts(), 10.0)
        except Exception:  # a dead or stuck engine must not fail the scrape; the last values stay
            log.debug("engine counters unavailable", exc_info=True)
            return
        for where, n in (counts or {}).items():
            self.engine_lora_loads.labels(where).set(n)

    def render(self) -> bytes:
        """The server's families, then vLLM's (and the process collectors) from the default registry."""
        prune_lora_info()
        return generate_latest(self.registry) + generate_latest(DEFAULT_REGISTRY)


def prune_lora_info(registry: CollectorRegistry = DEFAULT_REGISTRY) -> None:
    """Keep only the newest ``vllm:lora_requests_info`` series (see the module docstring).

    vLLM owns the gauge; it is found by name in the registry. Runs on the event loop, where
    vLLM's stat logger also sets it, so the two never interleave.
    """
    gauge = getattr(registry, "_names_to_collectors", {}).get(LORA_INFO)
    if not isinstance(gauge, Gauge):
        return
    try:
        series = dict(gauge._metrics)  # label values -> child
        if len(series) <= 1:
            return
        newest = max(series, key=lambda k: series[k]._value.get())
        for labels in series:
            if labels != newest:
                gauge.remove(*labels)
    except (AttributeError, KeyError, ValueError):  # a prometheus_client without these internals
        log.debug("cannot prune %s", LORA_INFO, exc_info=True)


def log_record(record: Any) -> None:
    """One quiet structured line per finished generation (the request id comes from the context)."""
    log.info("request finished", extra={
        "adapter": record.adapter, "tenant": getattr(record, "tenant", None), "outcome": record.status,
        "prompt_tokens": record.prompt_tokens, "completion_tokens": record.completion_tokens,
        "audio_s": round(record.audio_seconds, 3),
        "ttft_ms": None if record.ttft_s is None else round(record.ttft_s * 1000, 1),
        "e2e_ms": round(record.e2e_s * 1000, 1),
    })


class ObservabilityMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware): sets the request id for every log line of the request and
    returns it as ``X-Request-ID``. Nothing else: chat requests are counted by the chat route,
    which knows the tenant and the authorised adapter from its request context.

    Pure ASGI matters: it adds no task hop between the server and the route, so client disconnects
    reach the streaming response directly and the context variable is visible everywhere below.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = ""
        for k, v in scope.get("headers", ()):
            if k == b"x-request-id":
                rid = v.decode("latin-1")[:128]
                break
        rid = rid or uuid.uuid4().hex

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", ()) if h[0].lower() != b"x-request-id"]
                headers.append((b"x-request-id", rid.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        token = request_id_var.set(rid)
        try:
            await self.app(scope, receive, send_with_id)
        except BaseException:
            # Left set on purpose: the outer error handler logs "unhandled error" in this same task
            # and should carry the id too (the task ends with the request, so nothing leaks).
            token = None
            raise
        finally:
            if token is not None:
                request_id_var.reset(token)
