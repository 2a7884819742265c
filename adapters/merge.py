"""Merge an adapter's LoRA into a copy of its base model: the single-adapter fast path.

A server that only ever serves one adapter (``aura serve --merge-adapter NAME``) does not need
the engine's LoRA machinery at all: ``W' = W + (alpha / r) * B @ A`` for every adapted linear
layer gives the same function, and the engine then runs the plain model (no LoRA kernels, no
per-step LoRA metadata, compilation not disabled by LoRA). The audio embedding layer is not part
of the LLM's weights and stays with the server, unchanged.

Merged folders live under a cache and are keyed by the sha256 of the base model's files and of
the adapter's LoRA files, so a changed base or adapter can never be served from a stale merge,
and a second start with the same pair reuses the first one's folder. They are written into a
temporary folder and renamed into place, so a crash mid-merge leaves nothing that looks finished.

Adapted weights are written in float32 whatever the base stores (the demo base is bf16 on disk
and served in fp32): the delta is small next to W and would lose most of its bits if rounded to
bf16 before the engine casts to its serving dtype.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from adapters.adapter import LORA_CONFIG, LORA_WEIGHTS, MAX_LORA_CONFIG_BYTES, pattern_value, read_json_file

log = logging.getLogger(__name__)

MERGE_FORMAT = 1  # bump when the merged folder's layout or arithmetic changes
MERGED_WEIGHTS = "model.safetensors"
MERGE_INFO = "aura_merge.json"
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
_CHUNK = 1 << 20


class MergeError(ValueError):
    """The adapter cannot be merged into this base model (the message says why and what to do)."""


def _sha256_files(files: list[Path], root: Path) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(root)).encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def base_digest(base_dir: Path) -> str:
    """sha256 over the base folder's weights and config (what the merged weights derive from)."""
    base_dir = Path(base_dir)
    files = sorted(base_dir.glob("*.safetensors")) + [base_dir / "config.json"]
    return _sha256_files(files, base_dir)


def lora_digest(adapter_dir: Path) -> str:
    """sha256 over the adapter's LoRA config and weights (the audio layer does not enter the merge)."""
    adapter_dir = Path(adapter_dir)
    return _sha256_files([adapter_dir / LORA_CONFIG, adapter_dir / LORA_WEIGHTS], adapter_dir)


def lora_scale(lora_config: dict[str, object], module: str) -> float:
    """PEFT's scaling of ``module`` (its full name, e.g. model.layers.0.self_attn.q_proj): alpha / r, or
    alpha / sqrt(r) for rsLoRA, with r and alpha from ``rank_pattern`` / ``alpha_pattern`` where a key names it."""
    if lora_config.get("use_dora"):
        raise MergeError("DoRA adapters cannot be merged; train plain LoRA")
    ranks, alphas = lora_config.get("rank_pattern") or {}, lora_config.get("alpha_pattern") or {}
    assert isinstance(ranks, dict) and isinstance(alphas, dict)  # validate_adapter checked both
    r = pattern_value(ranks, module) or lora_config["r"]
    alpha = pattern_value(alphas, module) or lora_config.get("lora_alpha", r)
    assert isinstance(r, int) and isinstance(alpha, (int, float))  # validate_adapter checked both
    return float(alpha) / (math.sqrt(r) if lora_config.get("use_rslora") else r)


def merge_lora(base_dir: Path, adapter_dir: Path, out_dir: Path) -> Path:
    """Write ``base + LoRA`` into ``out_dir`` (which must not exist): one safetensors file with
    every base tensor, the adapted ones as float32, plus the base folder's config and tokenizer
    files. The adapter is assumed validated against this base (``adapters.validate``)."""
    base_dir, adapter_dir, out_dir = Path(base_dir), Path(adapter_dir), Path(out_dir)
    config = read_json_file(adapter_dir / LORA_CONFIG, max_bytes=MAX_LORA_CONFIG_BYTES)
    if not isinstance(config, dict):
        raise MergeError(f"{LORA_CONFIG} is not a JSON object")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(adapter_dir / LORA_WEIGHTS), framework="pt") as f:
        for key in f.keys():
            m = _LORA_KEY.match(key)
            if m is None:
                raise MergeError(f"{LORA_WEIGHTS}: unexpected tensor '{key}'")
            pairs.setdefault(m.group("module") + ".weight", {})[m.group("ab")] = f.get_tensor(key).float()
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(base_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    for key, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise MergeError(f"{LORA_WEIGHTS}: '{key}' has lora_{next(iter(ab))} without its partner")
        if key not in tensors:
            raise MergeError(f"{LORA_WEIGHTS}: the base model has no weight '{key}' to merge into")
        w = tensors[key]
        delta = ab["B"] @ ab["A"]
        if delta.shape != w.shape:
            raise MergeError(f"{LORA_WEIGHTS}: B @ A for '{key}' is {list(delta.shape)}, the base weight {list(w.shape)}")
        tensors[key] = (w.float() + lora_scale(config, key.removesuffix(".weight")) * delta).contiguous()
    out_dir.mkdir(parents=True)
    save_file(tensors, str(out_dir / MERGED_WEIGHTS), metadata={"format": "pt"})
    for extra in base_dir.iterdir():
        if extra.is_file() and extra.suffix != ".safetensors" and not extra.name.endswith(".index.json"):
            shutil.copy2(extra, out_dir / extra.name)
    return out_dir


def merged_model_dir(base_dir: Path, adapter_dir: Path, cache_root: Path) -> Path:
    """The merged folder for (base, adapter) under ``cache_root``, made once and reused.

    Keyed by both digests; built in a temporary sibling and renamed into place, so concurrent
    starts of the same pair both end up with one complete folder.
    """
    base_dir, adapter_dir, cache_root = Path(base_dir).resolve(), Path(adapter_dir).resolve(), Path(cache_root)
    b, a = base_digest(base_dir), lora_digest(adapter_dir)
    key = hashlib.sha256(f"{MERGE_FORMAT}:{b}:{a}".encode()).hexdigest()[:32]
    out = cache_root / key
    if (out / MERGE_INFO).is_file():
        return out
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=cache_root))
    try:
        merge_lora(base_dir, adapter_dir, tmp / "m")
        (tmp / "m" / MERGE_INFO).write_text(json.dumps(
            {"format": MERGE_FORMAT, "base": str(base_dir), "base_sha256": b, "adapter": str(adapter_dir),
             "lora_sha256": a}, indent=2) + "\n")
        try:
            os.replace(tmp / "m", out)
        except OSError:  # another start finished the same merge first
            if not (out / MERGE_INFO).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("merged the adapter's LoRA into the base weights",
             extra={"base": str(base_dir), "adapter": str(adapter_dir), "merged": str(out)})
    return out
