"""All server configuration in one settings object: defaults < environment (AURA_*) < CLI flags."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AURA_", extra="ignore")

    # What to serve. model=None means the embedded demo (converted on first use).
    model: Path | None = Field(None, description="Base LLM folder (HF format, safetensors).")
    model_name: str | None = Field(None, description="Name reported in /v1/models (default: folder name).")
    adapters: dict[str, str] = Field(default_factory=dict, description="name -> adapter path to load at start.")
    default_adapter: str | None = Field(None, description="Adapter used when a request names none.")
    merge_adapter: str | None = Field(
        None, description="Serve only this adapter (one of --adapter / the config file's, or 'aura-demo'), its LoRA "
        "merged into the base weights at start (cached under home/merged) and LoRA off in the engine: the fastest "
        "single-tenant path. Loading other adapters, replacing or unloading it answer 409; a new version needs a restart.")
    config_file: Path | None = Field(None, description="Tenancy/adapters YAML file.")
    home: Path = Field(Path.home() / ".cache" / "aura", description="Models, demo adapter and adapter cache.")

    # Adapter sources (server/sources.py): fetched into home/adapter-cache, content-addressed.
    adapter_cache_bytes: int = Field(10 * 1024**3, ge=1, description="Size cap of the adapter cache (LRU; live versions stay).")
    adapter_fetch_timeout_s: float = Field(300.0, gt=0, description="Deadline for fetching one adapter source.")
    adapter_allow_http: bool = Field(False, description="Accept plain http:// sources (trusted networks and tests only).")
    adapter_ca_bundle: Path | None = Field(None, description="CA bundle for https:// sources (default: system trust).")

    # Hardening against hostile tenants (server/sources.py, server/routes/metrics.py).
    adapter_roots: list[Path] = Field(
        default_factory=list, description="Folders under which tenants (non-admin keys) may load local or "
        "file:// adapter sources; empty: only admin keys may name server paths. Env: JSON list.")
    adapter_allowed_networks: list[str] = Field(
        default_factory=list, description="CIDRs a tenant's https/http source may reach although they are "
        "loopback, link-local or private (default: none; admins and the config file are not limited).")
    adapter_fetch_workers: int = Field(2, ge=1, le=64, description="Threads fetching adapter sources (their own "
                                       "pool: a slow source never delays audio decoding).")
    adapter_read_timeout_s: float = Field(10.0, gt=0, description="Longest wait for one read from a source.")
    metrics_key: str | None = Field(
        None, description="Key for GET /metrics (Authorization: Bearer; 'sha256:<hex>' or plain). Unset: "
        "/metrics needs an admin key when --config defines keys, and is open in open mode.")

    @field_validator("adapter_allowed_networks")
    @classmethod
    def _networks_parse(cls, v: list[str]) -> list[str]:
        """A typo in a CIDR fails at start, not at the first tenant fetch."""
        for n in v:
            ipaddress.ip_network(n, strict=False)  # ValueError names the bad entry
        return v

    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, description="Port to listen on.")
    metrics_port: int | None = Field(
        None, ge=1, le=65535, description="Serve GET /metrics on this port only (and nothing else there), not "
        "on the API port: keep the scrape endpoint off the network clients reach. Unset: /metrics on the API port.")
    metrics_host: str | None = Field(None, description="Address of the metrics listener (default: --host).")

    @model_validator(mode="after")
    def _metrics_listener_apart(self) -> Settings:
        if self.metrics_port is not None and self.metrics_port == self.port:
            raise ValueError(f"metrics_port {self.metrics_port} is the API port: choose another, or leave it unset")
        return self

    # Engine.
    engine: Literal["vllm", "reference"] = Field(
        "vllm", description="vllm (serving) or reference (plain PyTorch, one request at a time: parity and eval).")
    dtype: str = Field("auto", description="Model dtype for the engine (auto, bfloat16, float32).")
    max_model_len: int = Field(2048, description="Context length (prompt + answer) in tokens.")
    max_num_seqs: int = Field(64, description="Sequences in the engine's batch at once.")
    max_lora_rank: int = Field(16, description="Largest LoRA rank accepted (vLLM pads every slot to it: keep it tight on CPU).")
    max_loras: int = Field(4, description="Adapters resident in the engine's LoRA slots at once.")
    max_cpu_loras: int | None = Field(
        None, description="Adapters cached in the engine's host memory (LRU); default: every adapter configured at "
        "start plus max_loras (for versions draining in a swap), at least 16. A miss reads the adapter inside the "
        "engine's step loop, stalling every stream (aura_engine_lora_loads{where=\"in_loop\"}).")
    enable_prefix_caching: bool = Field(True, description="vLLM prefix caching.")
    cpu_kv_cache_gib: float = Field(1.0, description="KV cache size on the CPU backend (GiB).")
    gpu_memory_utilization: float = Field(0.85, description="Fraction of GPU memory vLLM may use.")
    enforce_eager: bool = Field(True, description="No CUDA graphs / torch.compile (faster start).")
    seed: int = Field(0, description="Engine seed.")

    # CPU LoRA path and step scheduling (server/engine/cpu_lora.py, server/engine/vllm_engine.py).
    cpu_lora_kernel: Literal["segmented", "vllm"] = Field(
        "segmented", description="CPU LoRA ops: one GEMM pair per adapter segment, or vLLM's per-token gathers.")
    max_num_batched_tokens: int | None = Field(
        None, ge=64, description="Tokens one engine step may run (chunked prefill budget); default 256 on the CPU, vLLM's elsewhere.")
    kv_block_size: int | None = Field(
        None, ge=16, description="KV block size, the unit prefix caching shares; default 32 on the CPU, vLLM's elsewhere.")

    # Audio front end.
    max_upload_bytes: int = Field(25 * 1024 * 1024, description="Largest audio upload (bytes).")
    max_audio_seconds: float = Field(60.0, description="Longest audio in one request (seconds).")
    embed_max_batch: int = Field(16, description="Clips per audio-layer batch.")
    embed_batch_window_ms: float = Field(2.0, description="Longest a queued clip waits for its batch (ms).")
    device: str = Field("auto", description="Device for features + audio layer: auto (cuda if present), cpu, cuda.")
    frontend_threads: int = Field(1, description="torch intra-op threads for the front end in this process.")

    # Generation limits.
    default_max_tokens: int = Field(256, description="Answer length when a request sets none (tokens).")
    max_tokens_limit: int = Field(2048, description="Largest max_tokens a request may ask for.")

    # Backpressure, deadlines and drain (server/admission.py, server/lifecycle.py).
    max_concurrent_requests: int = Field(64, ge=1, description="Requests in the pipeline (decode..last token) at once.")
    max_queued_requests: int = Field(128, ge=0, description="Requests waiting for a pipeline slot; beyond: 429.")
    queue_timeout_s: float = Field(30.0, gt=0, description="Longest wait for a pipeline slot before 429.")
    tenant_max_concurrent: int | None = Field(
        None, ge=1, description="Pipeline slots one tenant may hold; default: 3/4 of max_concurrent_requests.")
    request_timeout_s: float = Field(300.0, gt=0, description="Default and maximum deadline of one request.")
    drain_timeout_s: float = Field(30.0, ge=0, description="On SIGTERM: how long in-flight requests may finish.")
    tenant_header: str | None = Field(
        None, description="Header naming the tenant when no API key does (tests/trusted proxies only).")
    metrics_max_label_values: int = Field(16, ge=1, description="Distinct adapters/tenants in metric labels; rest: 'other'.")
    log_requests: bool = Field(True, description="One structured log line per finished request.")

    # Request-path limits (server/routes/door.py, server/serving.py): every size, count and
    # duration a caller controls, checked before the work it would cost.
    body_read_timeout_s: float = Field(
        10.0, gt=0, description="Deadline for receiving a request body (read before a pipeline slot is taken); "
                                "past it: 408.")
    max_uploads: int | None = Field(
        None, ge=1, description="Request bodies being read at once; default max_concurrent_requests + "
                                "max_queued_requests. Beyond: 429.")
    max_prompt_chars: int = Field(32768, ge=1, description="Characters of text (all messages) in one request.")
    max_stop_strings: int = Field(16, ge=0, description="Stop strings in one request.")
    max_stop_chars: int = Field(256, ge=1, description="Characters in one stop string.")
    max_json_depth: int = Field(16, ge=4, description="Nesting depth of a JSON request body.")
    max_json_nodes: int = Field(10000, ge=16, description="Values (objects, arrays, strings...) in a JSON request body.")
    max_form_fields: int = Field(32, ge=1, description="Fields in a multipart request.")
    max_form_field_bytes: int = Field(256 * 1024, ge=1024, description="Bytes in one multipart text field.")
    engine_death_exit_s: float = Field(
        5.0, ge=0, description="After the engine dies: seconds answering 503 (so probes and clients see why), "
                               "then the process exits with status 3 for a supervisor to restart it.")

    # Realtime sessions (GET /v1/realtime, server/realtime.py).
    realtime_max_sessions: int = Field(64, ge=1, description="Realtime WebSocket sessions open at once; beyond: refused.")
    realtime_max_event_bytes: int = Field(2 * 1024 * 1024, ge=1024, description="Bytes in one realtime client event.")
    realtime_idle_timeout_s: float = Field(300.0, gt=0, description="A realtime session with no client event for this long is closed.")
    realtime_prefill_interval_ms: float = Field(
        400.0, ge=0, description="While the user speaks, warm the engine's prefix cache with the audio so far "
                                 "every this many ms of audio (0: off), so end of speech leaves only the tail to prefill.")

    # Scale-out on Ray Serve (server/cluster/, the `ray` extra). replicas unset: one process, no Ray.
    replicas: int | None = Field(
        None, ge=1, description="Serve with Ray Serve: this many model replicas, each with its own engine, behind one "
                                "ingress (same HTTP API); unset: a single process without Ray.")
    ray_address: str | None = Field(
        None, description="Ray cluster to join with --replicas (ray://host:10001, or 'auto'); unset: RAY_ADDRESS, "
                          "else a new local cluster.")
    ray_num_cpus: int | None = Field(
        None, ge=1, description="CPUs a locally started Ray cluster advertises (default: the machine's). Replicas "
                                "reserve none; vLLM and the front end use their own thread settings.")
    ray_object_store_bytes: int = Field(
        200 * 1024**2, ge=80 * 1024**2, description="Object store of a locally started Ray cluster (bytes); the "
                                                    "requests and chunks that cross it are small.")
    replica_affinity: bool = Field(
        True, description="Route each request to a replica that holds its adapter (Serve model multiplexing); off: "
                          "Serve's default routing (the benchmark's baseline).")
    replica_metrics_port: int | None = Field(
        None, ge=1, le=65535, description="Per-replica Prometheus endpoints: the model replica of local rank r serves "
                                          "GET /metrics on this port + r (series labelled replica=...); unset: off.")
    autoscale_max_replicas: int | None = Field(
        None, ge=1, description="Autoscale the model replicas between --replicas and this many (Serve "
                                "AutoscalingConfig); unset: a fixed count.")
    autoscale_target_ongoing_requests: float = Field(
        8.0, gt=0, description="Autoscaling target: requests in progress per model replica.")

    log_level: str = Field("INFO", description="debug, info, warning, error (debug also shows vLLM's info lines).")
    log_format: Literal["json", "text"] = Field("json", description="Log lines as JSON objects or as text.")
    access_log: bool = Field(False, description="uvicorn's access log (one line per HTTP request).")
    keep_alive_timeout_s: float = Field(
        75.0, gt=0, le=3600, description="How long an idle HTTP keep-alive connection stays open. Longer than "
        "the idle timeout of the clients and proxies in front (60 s for most load balancers), so that they, "
        "not the server, close idle connections: a request sent just as the server closes one fails.")

    def resolved_max_cpu_loras(self, configured: int = 0) -> int:
        """The host cache holds every adapter configured at start: with fewer places than adapters in
        use, an LRU cache misses on every request of a round-robin (each miss a read in the step loop)."""
        return self.max_cpu_loras or max(self.max_loras, 16, configured + self.max_loras)

    def resolved_tenant_max_concurrent(self) -> int:
        """3/4 of what can really run at once by default — the pipeline or the engine's batch
        (``max_num_seqs``), whichever is smaller — so a lone tenant gets most of it and a quarter
        stays free for others however hard one tenant pushes. Fair share must hold at the engine:
        a tenant holding more pipeline slots than the batch has rows would fill the whole batch
        and queue everyone else inside vLLM. An explicit value is capped at ``max_num_seqs``."""
        if self.tenant_max_concurrent is not None:
            return min(self.tenant_max_concurrent, self.max_num_seqs)
        return max(1, (3 * min(self.max_concurrent_requests, self.max_num_seqs)) // 4)

    def resolved_max_uploads(self) -> int:
        return self.max_uploads or self.max_concurrent_requests + self.max_queued_requests

    def max_body_bytes(self) -> int:
        """The largest request body worth reading: the upload limit as base64 (4/3) plus 1 MiB of
        form fields / JSON around it. Anything larger is refused, by its Content-Length or as it streams."""
        return self.max_upload_bytes * 4 // 3 + (1 << 20)
