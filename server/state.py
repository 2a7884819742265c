"""Everything a running server holds, built once in the app's lifespan."""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from adapters.adapter import DEMO_ADAPTER_DIR
from adapters.base_model import BaseModelInfo, read_base_model
from server.admission import AdmissionController
from server.config import Settings
from server.engine.base import Engine
from server.frontend import AudioFrontend
from server.registry import AdapterRegistry, MergedAdapter
from server.serving import ChatService
from server.sources import AdapterCache
from server.tenancy import Tenancy

log = logging.getLogger("server")

@dataclass
class ServerState:
    settings: Settings
    model_path: Path
    model_name: str
    base: BaseModelInfo
    tokenizer: PreTrainedTokenizerBase
    engine: Engine
    registry: AdapterRegistry
    frontend: AudioFrontend
    service: ChatService
    admission: AdmissionController
    tenancy: Tenancy  # API keys -> tenants (open when no --config)
    adapter_cache: AdapterCache  # where adapter sources are materialised
    started_at: float = 0.0
    # Why the process must end (the engine died): the lifecycle exits non-zero once it is set.
    fatal: str | None = None

    @property
    def draining(self) -> bool:
        return self.admission.draining


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def resolve_model(settings: Settings) -> tuple[Path, str]:
    if settings.model is not None:
        path = Path(settings.model).expanduser().resolve()
        return path, settings.model_name or path.name
    from adapters.provision.demo import DEMO_LLM_NAME, prepare_demo_models

    log.info("no --model given: serving the embedded demo model", extra={"model": DEMO_LLM_NAME})
    models = prepare_demo_models(settings.home)
    return models.llm, settings.model_name or DEMO_LLM_NAME


def build_engine(settings: Settings, model_path: Path, tokenizer: PreTrainedTokenizerBase,
                 base: BaseModelInfo, *, enable_lora: bool = True, configured_adapters: int = 0) -> Engine:
    if settings.engine == "reference":
        from server.engine.reference import ReferenceEngine

        dtype = torch.float32 if settings.dtype in ("auto", "float32") else getattr(torch, settings.dtype)
        return ReferenceEngine(model=str(model_path), tokenizer=tokenizer, dtype=dtype,
                               device=resolve_device(settings.device))
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from server.engine.vllm_engine import VLLMEngine

    return VLLMEngine(
        model=str(model_path), tokenizer=tokenizer, hidden_size=base.hidden_size, dtype=settings.dtype,
        max_model_len=settings.max_model_len, max_num_seqs=settings.max_num_seqs,
        max_lora_rank=settings.max_lora_rank, max_loras=settings.max_loras,
        max_cpu_loras=settings.resolved_max_cpu_loras(configured_adapters), enable_prefix_caching=settings.enable_prefix_caching,
        gpu_memory_utilization=settings.gpu_memory_utilization, cpu_kv_cache_gib=settings.cpu_kv_cache_gib,
        enforce_eager=settings.enforce_eager, seed=settings.seed,
        lora_target_modules=list(base.linear_modules),
        cpu_lora_kernel=settings.cpu_lora_kernel, max_num_batched_tokens=settings.max_num_batched_tokens,
        block_size=settings.kv_block_size, enable_lora=enable_lora,
        progress_bars=settings.log_level.upper() == "DEBUG",
    )


def default_adapter_path(settings: Settings, model_path: Path, base: BaseModelInfo) -> tuple[Path, bool]:
    """The adapter served when none is configured: the committed demo adapter if it fits this
    base model, else a freshly initialised (untrained) one, created once and cached."""
    from adapters.validate import AdapterValidationError, validate_adapter

    if DEMO_ADAPTER_DIR.is_dir():
        try:
            validate_adapter(DEMO_ADAPTER_DIR, base=base, max_lora_rank=settings.max_lora_rank)
            return DEMO_ADAPTER_DIR, True
        except AdapterValidationError as e:
            log.warning("the demo adapter does not fit this base model; using an untrained one",
                        extra={"reason": str(e)})
    from adapters.adapter import init_adapter

    out = settings.home / "adapters" / f"untrained-{base.fingerprint.split(':')[-1][:12]}"
    if not (out / "aura_config.json").exists():
        init_adapter(model_path, out, rank=8, seed=0)
    return out, False


Preload = tuple[str, str, bool | None, str | None]  # (name, source, pin, sha256)


async def prepare_merged(settings: Settings, preloads: list[Preload], model_path: Path, base: BaseModelInfo,
                         cache: AdapterCache) -> tuple[Path, MergedAdapter]:
    """``--merge-adapter NAME``: the base model with NAME's LoRA merged in, for a LoRA-free engine.

    NAME must be the one adapter configured (``--adapter`` / the config file / the demo): a
    merged engine cannot serve any other LoRA, so a second configured adapter is a start-up
    error rather than a surprise 409 later. The adapter goes through the same content-addressed
    cache and validation as every load; the merged folder is keyed by both digests
    (``adapters.merge``), so a restart with a new version merges again and an unchanged pair
    reuses the folder.
    """
    from adapters.merge import MergeError, lora_digest, merged_model_dir
    from adapters.validate import AdapterValidationError, validate_adapter
    from server.sources import SourceError

    name = settings.merge_adapter
    names = [p[0] for p in preloads]
    if name not in names:
        raise RuntimeError(f"--merge-adapter {name}: no adapter of that name is configured (configured: {names}); "
                           f"pass --adapter {name}=PATH or list it in the config file")
    if len(set(names)) > 1:
        others = sorted(set(names) - {name})
        raise RuntimeError(f"--merge-adapter {name} serves that one adapter only, but {others} are configured too; "
                           "remove them or start without --merge-adapter")
    _, source, _, sha = next(p for p in preloads if p[0] == name)

    def check(folder: Path) -> None:
        validate_adapter(folder, base=base, max_lora_rank=settings.max_lora_rank)

    try:
        fetched = await cache.fetch(source, sha256=sha, in_use=set, trusted=True, validate=check)
        merged_dir = await asyncio.to_thread(merged_model_dir, model_path, fetched.path, settings.home / "merged")
        digest = await asyncio.to_thread(lora_digest, fetched.path)
    except (SourceError, AdapterValidationError, MergeError) as e:
        raise RuntimeError(f"--merge-adapter {name}: cannot merge the adapter from {source}: {e}") from None
    log.info("serving one adapter merged into the base weights (LoRA off in the engine)",
             extra={"adapter": name, "merged_model": str(merged_dir)})
    return merged_dir, MergedAdapter(name, digest)


async def build_state(settings: Settings, *, preload: bool = True) -> ServerState:
    """``preload=False``: no adapter at start (a Ray model replica loads each on first use)."""
    from transformers import AutoTokenizer

    from server.adapter_admin import load_from_source
    from server.errors import APIError
    from server.tenancy import load_config

    # Read the config first: a typo in it should fail in a second, not after the engine started.
    tenancy_config = load_config(settings.config_file) if settings.config_file else None
    tenancy = Tenancy(tenancy_config)
    model_path, model_name = resolve_model(settings)
    if settings.model is None and settings.dtype == "auto" and resolve_device(settings.device) == "cpu":
        # The demo adapter was trained in fp32 on the CPU; vLLM's CPU bf16 kernels flip the demo
        # model's near-ties (e.g. "The" vs "L" as the first answer token), so serve what was trained.
        settings = settings.model_copy(update={"dtype": "float32"})
    base = read_base_model(model_path)
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    if settings.engine == "vllm":
        torch.set_num_threads(max(1, settings.frontend_threads))
    adapter_cache = AdapterCache(
        settings.home / "adapter-cache", max_bytes=settings.adapter_cache_bytes,
        timeout_s=settings.adapter_fetch_timeout_s, allow_http=settings.adapter_allow_http,
        verify=str(settings.adapter_ca_bundle) if settings.adapter_ca_bundle else True,
        roots=settings.adapter_roots, allowed_networks=settings.adapter_allowed_networks,
        workers=settings.adapter_fetch_workers, read_timeout_s=settings.adapter_read_timeout_s)

    # (name, source, pin, sha256): --adapter flags first, then the config file's preloads.
    # Flag adapters stay pinned while slots allow (a server's few named adapters should not be
    # LRU-evicted); every load goes through the cache so a version's files never change under it.
    preloads: list[Preload] = [
        (name, str(path), None, None) for name, path in settings.adapters.items()]  # pin: None = if room
    preloads += [(a.name, a.source, a.pin, a.sha256) for a in (tenancy_config.adapters if tenancy_config else [])]
    if not preload and settings.merge_adapter:
        raise RuntimeError("--merge-adapter serves one adapter merged into one engine; Ray replicas (--replicas) "
                           "load adapters per replica on first use, so start them without --merge-adapter")
    if preload and not preloads:
        path, trained = default_adapter_path(settings, model_path, base)
        preloads = [("default" if not trained else "aura-demo", str(path), None, None)]

    engine_model, merged = model_path, None
    if settings.merge_adapter:
        engine_model, merged = await prepare_merged(settings, preloads, model_path, base, adapter_cache)
    engine = build_engine(settings, engine_model, tokenizer, base, enable_lora=merged is None,
                          configured_adapters=len(preloads))
    await engine.start()
    device = resolve_device(settings.device)
    registry = AdapterRegistry(engine, base, max_lora_rank=settings.max_lora_rank, device=device,
                               max_pinned=max(0, settings.max_loras - 1), merged=merged)
    frontend = AudioFrontend(device=device, max_batch=settings.embed_max_batch,
                             window_ms=settings.embed_batch_window_ms, threads=settings.frontend_threads,
                             max_upload_bytes=settings.max_upload_bytes,
                             max_audio_seconds=settings.max_audio_seconds)
    admission = AdmissionController.from_settings(settings)
    service = ChatService(settings, engine, registry, frontend, tokenizer, model_name, admission)
    state = ServerState(settings, model_path, model_name, base, tokenizer, engine, registry, frontend, service,
                        admission, tenancy, adapter_cache)
    if not preload:
        return state

    for name, source, pin_wish, sha in preloads:
        pin = bool(pin_wish)
        if pin_wish is None:
            pinned = sum(v.pinned for v in registry.live_versions())
            pin = registry.max_pinned is None or pinned < registry.max_pinned
        try:
            version, _ = await load_from_source(registry, state.adapter_cache, name, source, trusted=True,
                                                pin=pin, sha256=sha)
        except APIError as e:
            raise RuntimeError(f"cannot load adapter '{name}' from {source}: {e.message}") from None
        if not version.trained:
            log.warning(
                "adapter is UNTRAINED: it was freshly initialised, so answers to speech are noise until "
                "a trained adapter is loaded", extra={"adapter": name, "path": source})
    if tenancy_config is not None and tenancy_config.default_adapter:
        registry.get(tenancy_config.default_adapter)
        registry.default = tenancy_config.default_adapter
    tenancy.log_startup(settings.config_file)
    if settings.default_adapter:
        registry.get(settings.default_adapter)
        registry.default = settings.default_adapter
    return state
