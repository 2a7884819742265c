"""Loading adapters from sources, shared by ``POST /v1/adapters`` and the config file's preloads.

Kept out of the router so startup and HTTP load through exactly the same steps: fetch into the
content-addressed cache, validate, load into the engine, swap — with every failure turned into
one clear :class:`APIError` and nothing serving changed.
"""

from __future__ import annotations

from pathlib import Path

from adapters.validate import AdapterValidationError, validate_adapter
from server.errors import Unprocessable, error_for_kind
from server.protocol import AdapterInfo, AdapterVersionInfo
from server.registry import AdapterRegistry, AdapterVersion
from server.sources import AdapterCache, SourceError, redact


def validation_error(e: AdapterValidationError) -> Unprocessable:
    """422 naming the file at fault; ``code`` is the validator's stable code (rank_too_large, ...)."""
    where = f"{e.file}: " if e.file else ""
    return Unprocessable(f"adapter rejected: {where}{e.message}", code=e.code, param="source")


async def load_from_source(registry: AdapterRegistry, cache: AdapterCache, name: str, source: str, *,
                           trusted: bool, pin: bool = False,
                           sha256: str | None = None) -> tuple[AdapterVersion, int | None]:
    """Fetch + validate + install; returns the new version and the version it replaced (if any).

    ``trusted``: an admin key or the server's own config (any local path, any host); tenants
    with ``manage: true`` are confined (see :mod:`server.sources`). The adapter is validated in
    the fetch's staging folder, so a rejected one never enters the cache.
    """
    previous = registry._current.get(name)

    def check(folder: Path) -> None:
        validate_adapter(folder, base=registry.base, max_lora_rank=registry.max_lora_rank)

    async def fetch() -> Path:
        try:
            return (await cache.fetch(source, sha256=sha256, in_use=registry.live_paths, trusted=trusted,
                                      validate=check)).path
        except SourceError as e:
            raise error_for_kind(e.kind, e.message, family="source", param="source") from None

    try:
        version = await registry.load(name, pin=pin, source=redact(source), fetch=fetch)
    except AdapterValidationError as e:
        raise validation_error(e) from None
    return version, previous.version if previous is not None else None


def adapter_info(v: AdapterVersion, registry: AdapterRegistry, resident_ids: set[int] | None,
                 default: str | None, previous_version: int | None = None) -> AdapterInfo:
    a = v.adapter
    if v.merged:
        resident = "engine"  # in the engine's weights (--merge-adapter)
    elif resident_ids is None:
        resident = "unknown"
    else:
        resident = "engine" if v.lora.lora_id in resident_ids else "disk"
    draining = [AdapterVersionInfo(version=o.version, lora_id=o.lora.lora_id, status=o.status,
                                   active_requests=o.active)
                for o in registry.live_versions() if o.name == v.name and o is not v]
    return AdapterInfo(
        name=v.name, version=v.version, lora_id=v.lora.lora_id, status=v.status, rank=a.lora_rank,
        alpha=a.lora_alpha, target_modules=list(a.target_modules), base_model=a.config.base_model.name,
        base_model_fingerprint=a.config.base_model.fingerprint, trained=v.trained, pinned=v.pinned,
        default=v.name == default, source=v.source, loaded_at=int(v.loaded_at), resident=resident,
        active_requests=v.active, draining=draining, previous_version=previous_version,
    )
