"""All server configuration in one settings object: defaults < environment (AURA_*) < CLI flags."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AURA_", extra="ignore")

    # What to serve. model=None means the embedded demo (converted on first use).
    model: Path | None = Field(None, description="Base LLM folder (HF format, safetensors).")
    model_name: str | None = Field(None, description="Name reported in /v1/models (default: folder name).")
    adapters: dict[str, str] = Field(default_factory=dict, description="name -> adapter path to load at start.")
    default_adapter: str | None = Field(None, description="Adapter used when a request names none.")
    config_file: Path | None = Field(None, description="Tenancy/adapters YAML file.")
    home: Path = Field(Path.home() / ".cache" / "aura", description="Models, demo adapter and adapter cache.")

    # Adapter sources (server/sources.py): fetched into home/adapter-cache, content-addressed.
    adapter_cache_bytes: int = Field(10 * 1024**3, ge=1, description="Size cap of the adapter cache (LRU; live versions stay).")
    adapter_fetch_timeout_s: float = Field(300.0, gt=0, description="Deadline for fetching one adapter source.")
    adapter_allow_http: bool = Field(False, description="Accept plain http:// sources (trusted networks and tests only).")
    adapter_ca_bundle: Path | None = Field(None, description="CA bundle for https:// sources (default: system trust).")

    host: str = "127.0.0.1"
    port: int = 8000

    # Engine.
    engine: Literal["vllm", "reference"] = "vllm"
    dtype: str = Field("auto", description="Model dtype for the engine (auto, bfloat16, float32).")
    max_model_len: int = 2048
    max_num_seqs: int = 64
    max_lora_rank: int = Field(16, description="Largest LoRA rank accepted (vLLM pads every slot to it: keep it tight on CPU).")
    max_loras: int = Field(4, description="Adapters resident in the engine's LoRA slots at once.")
    max_cpu_loras: int | None = Field(None, description="Adapters cached in host memory (LRU); default max(max_loras, 16).")
    enable_prefix_caching: bool = True
    cpu_kv_cache_gib: float = 1.0
    gpu_memory_utilization: float = 0.85
    enforce_eager: bool = True
    seed: int = 0

    # CPU LoRA path and step scheduling (server/engine/cpu_lora.py, server/engine/vllm_engine.py).
    cpu_lora_kernel: Literal["segmented", "vllm"] = Field(
        "segmented", description="CPU LoRA ops: one GEMM pair per adapter segment, or vLLM's per-token gathers.")
    max_num_batched_tokens: int | None = Field(
        None, ge=64, description="Tokens one engine step may run (chunked prefill budget); default 256 on the CPU, vLLM's elsewhere.")
    kv_block_size: int | None = Field(
        None, ge=16, description="KV block size, the unit prefix caching shares; default 32 on the CPU, vLLM's elsewhere.")

    # Audio front end.
    max_upload_bytes: int = 25 * 1024 * 1024
    max_audio_seconds: float = 60.0
    embed_max_batch: int = 16
    embed_batch_window_ms: float = 2.0
    device: str = Field("auto", description="Device for features + audio layer: auto (cuda if present), cpu, cuda.")
    frontend_threads: int = Field(1, description="torch intra-op threads for the front end in this process.")

    # Generation limits.
    default_max_tokens: int = 256
    max_tokens_limit: int = 2048

    # Backpressure, deadlines and drain (server/limits.py, server/lifecycle.py).
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

    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "json"
    access_log: bool = False

    def resolved_max_cpu_loras(self) -> int:
        return self.max_cpu_loras or max(self.max_loras, 16)

    def resolved_tenant_max_concurrent(self) -> int:
        """3/4 of the pipeline by default: a lone tenant gets most of it, and a quarter of the slots
        stay free for others however hard one tenant pushes."""
        if self.tenant_max_concurrent is not None:
            return self.tenant_max_concurrent
        return max(1, (3 * self.max_concurrent_requests) // 4)
