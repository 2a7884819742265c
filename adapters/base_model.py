"""What an adapter needs to know about a base model, read from its folder without loading it.

The fingerprint ties an adapter to the exact weights it was trained on: two checkpoints with the
same architecture (say an instruct and a base model) get different fingerprints, while bf16 and
fp32 copies of the same weights agree (the sampled values are rounded to bf16 before hashing).
"""

from __future__ import annotations

import hashlib
import json
import re
from functools import lru_cache
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict
from safetensors import safe_open

_CONFIG_KEYS = (
    "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "intermediate_size", "vocab_size", "tie_word_embeddings",
)
_LINEAR_NAME = re.compile(r"\.([A-Za-z0-9_]+)\.weight$")


class BaseModelInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    path: str
    architecture: str
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    vocab_size: int
    fingerprint: str
    # Leaf module names that own a 2-D weight (q_proj, gate_proj, ...): what LoRA may target.
    linear_modules: tuple[str, ...]
    # name -> (out_features, in_features) for one layer; the shapes LoRA A/B must fit.
    linear_shapes: dict[str, tuple[int, int]]
    # name -> the full module name in layer 0 (q_proj -> model.layers.0.self_attn.q_proj): what a per-layer
    # LoRA rank (PEFT's rank_pattern) names
    linear_names: dict[str, str] = {}

    def module_name(self, layer: int, module: str) -> str:
        """The full name of ``module`` in block ``layer``, as PEFT and vLLM match rank_pattern keys against it."""
        return self.linear_names[module].replace(".layers.0.", f".layers.{layer}.", 1)


def _weight_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weights (convert the model first)")
    return files


@lru_cache(maxsize=32)
def _read(path_str: str, mtime: float) -> BaseModelInfo:
    path = Path(path_str)
    config = json.loads((path / "config.json").read_text())
    h = hashlib.sha256()
    h.update(json.dumps({k: config.get(k) for k in _CONFIG_KEYS}, sort_keys=True).encode())
    linear: dict[str, tuple[int, int]] = {}
    names: dict[str, str] = {}
    embed_key = None
    handles = []
    for file in _weight_files(path):
        f = safe_open(str(file), framework="pt")
        handles.append(f)
        for key in sorted(f.keys()):
            shape = tuple(f.get_slice(key).get_shape())
            h.update(f"{key}:{shape}".encode())
            m = _LINEAR_NAME.search(key)
            if m and len(shape) == 2 and ".layers.0." in key:
                linear[m.group(1)] = (int(shape[0]), int(shape[1]))
                names[m.group(1)] = key.removesuffix(".weight")
            if key.endswith("embed_tokens.weight"):
                embed_key = (f, key)
    if embed_key is not None:
        f, key = embed_key
        sample = f.get_slice(key)[:8].to(torch.bfloat16).float().contiguous()
        h.update(sample.numpy().tobytes())
    archs = config.get("architectures") or ["unknown"]
    return BaseModelInfo(
        path=str(path),
        architecture=archs[0],
        model_type=config.get("model_type", "unknown"),
        hidden_size=int(config["hidden_size"]),
        num_hidden_layers=int(config["num_hidden_layers"]),
        vocab_size=int(config["vocab_size"]),
        fingerprint="sha256:" + h.hexdigest()[:32],
        linear_modules=tuple(sorted(linear)),
        linear_shapes=linear,
        linear_names=names,
    )


def read_base_model(path: str | Path) -> BaseModelInfo:
    path = Path(path).resolve()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a model folder (no config.json)")
    return _read(str(path), (path / "config.json").stat().st_mtime)
