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

    host: str = "127.0.0.1"
    port: int = 8000

    # Engine.
    engine: Literal["vllm", "reference"] = "vllm"
    dtype: str = Field("auto", description="Model dtype for the engine (auto, bfloat16, float32).")
    max_model_len: int = 2048
    max_num_seqs: int = 64
    max_lora_rank: int = 64
    max_loras: int = Field(4, description="Adapters resident in the engine's LoRA slots at once.")
    max_cpu_loras: int | None = Field(None, description="Adapters cached in host memory (LRU); default max(max_loras, 16).")
    enable_prefix_caching: bool = True
    cpu_kv_cache_gib: float = 1.0
    gpu_memory_utilization: float = 0.85
    enforce_eager: bool = True
    seed: int = 0

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

    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "json"
    access_log: bool = False

    def resolved_max_cpu_loras(self) -> int:
        return self.max_cpu_loras or max(self.max_loras, 16)
