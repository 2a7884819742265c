"""Validate an adapter directory before anything of it reaches an engine.

One function, shared by ``aura adapter validate`` and the server's load path, so the command
line and the HTTP API can never disagree about what a good adapter is. Each failure names the
file and says how to fix it.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from pydantic import ValidationError
from safetensors import SafetensorError, safe_open

from adapters.adapter import (
    AUDIO_WEIGHTS, AURA_CONFIG, CHECKSUMMED, FORMAT_VERSION, LORA_CONFIG, LORA_WEIGHTS, MAX_CONFIG_BYTES,
    MAX_LORA_CONFIG_BYTES, MAX_PATTERN_KEYS, PATTERN_KEY, AdapterFileError, AuraConfig, audio_layer_shapes,
    max_lora_rank_of, pattern_value, read_json_file, sha256_file,
)
from adapters.bounded_json import JSONValue
from adapters.base_model import BaseModelInfo

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
SUPPORTED_FEATURES = {("whisper_log_mel", 16000)}
_LORA_KEY = re.compile(
    r"^base_model\.model\.(?:.*\.)?layers\.(\d+)\.(?:.*\.)?([A-Za-z0-9_]+)\.lora_([AB])(?:\.default)?\.weight$"
)


class AdapterValidationError(ValueError):
    """``code`` is stable for programs; ``file`` is the file at fault (or None for the folder)."""

    def __init__(self, message: str, *, code: str, file: str | None = None) -> None:
        self.message = message
        self.code = code
        self.file = file
        super().__init__(f"{file}: {message}" if file else message)


def _fail(code: str, file: str | None, message: str) -> AdapterValidationError:
    return AdapterValidationError(message, code=code, file=file)


def safetensors_header(path: Path, file: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensor name -> (shape, dtype) from a safetensors header, without reading any weight."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise _fail("unreadable_weights", file, f"not a readable safetensors file ({e}); re-export it with safetensors") from e


def _pattern(lora: dict[str, JSONValue], field: str, *, integer: bool) -> dict[str, float]:
    """A PEFT ``rank_pattern`` / ``alpha_pattern``: at most MAX_PATTERN_KEYS module-name keys (engines read each key
    as a regular expression, so a key with any other character could make every load backtrack for minutes) to
    positive numbers (ranks: integers)."""
    pattern = lora.get(field) or {}
    if not isinstance(pattern, dict):
        raise _fail("bad_lora_config", LORA_CONFIG, f"'{field}' must map module names to numbers")
    if len(pattern) > MAX_PATTERN_KEYS:
        raise _fail("bad_lora_config", LORA_CONFIG, f"'{field}' has {len(pattern)} keys; at most {MAX_PATTERN_KEYS}")
    out: dict[str, float] = {}
    for key, value in pattern.items():
        if not PATTERN_KEY.match(key):
            raise _fail("bad_lora_config", LORA_CONFIG, f"'{field}' key {key[:80]!r} must be a module name "
                        "(letters, digits, '_' and '.', at most 256 characters); regular expressions are not accepted")
        kind = "integer" if integer else "number"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)) \
                or not math.isfinite(value) or value <= 0:
            raise _fail("bad_lora_config", LORA_CONFIG, f"'{field}' value for {key[:80]!r} must be a positive {kind}, got {value!r:.40}")
        out[key] = value
    return out


def _module_name(weight_key: str) -> str:
    """``base_model.model.<module>.lora_A[.default].weight`` -> ``<module>``, the name PEFT matches patterns against."""
    name = weight_key.removeprefix("base_model.model.")
    return re.sub(r"\.lora_[AB](?:\.default)?\.weight$", "", name)


def validate_adapter(
    path: str | Path,
    *,
    base: BaseModelInfo | None = None,
    max_lora_rank: int | None = None,
    verify_checksums: bool = True,
) -> AuraConfig:
    """Return the adapter's config, or raise :class:`AdapterValidationError` on the first problem."""
    path = Path(path)
    if not path.is_dir():
        raise _fail("not_found", None, f"{path} is not a directory; point at an AuRA adapter folder")
    # Anywhere in the folder, not just the top: a nested pickle is just as able to run code.
    pickles = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise _fail("pickle_weights", pickles[0],
                    "pickled weights are refused (they can run code when loaded); save with safetensors")
    for f in (AURA_CONFIG, LORA_CONFIG, LORA_WEIGHTS, AUDIO_WEIGHTS):
        if not (path / f).is_file():
            raise _fail("missing_file", f, "missing; an AuRA adapter folder needs "
                        f"{AURA_CONFIG}, {LORA_CONFIG}, {LORA_WEIGHTS} and {AUDIO_WEIGHTS}")

    try:
        raw = read_json_file(path / AURA_CONFIG, max_bytes=MAX_CONFIG_BYTES)
    except AdapterFileError as e:
        raise _fail("bad_config", AURA_CONFIG, f"{e.message}; re-save the adapter") from e
    if isinstance(raw, dict) and raw.get("format_version") not in (None, FORMAT_VERSION):
        raise _fail("unsupported_version", AURA_CONFIG,
                    f"format_version {raw.get('format_version')} is not supported (this server reads {FORMAT_VERSION})")
    try:
        config = AuraConfig.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        raise _fail("bad_config", AURA_CONFIG, f"field '{loc}': {first['msg']}") from e

    if verify_checksums:
        for f in CHECKSUMMED:
            want = config.files.get(f)
            if want is None:
                raise _fail("missing_checksum", AURA_CONFIG, f"no sha256 for {f} under 'files'; re-save the adapter")
            if sha256_file(path / f) != want:
                raise _fail("checksum_mismatch", f, "sha256 does not match aura_config.json; the file is corrupt or was changed after saving")

    feat = config.features
    if (feat.kind, feat.sample_rate) not in SUPPORTED_FEATURES:
        raise _fail("unsupported_features", AURA_CONFIG,
                    f"features {feat.kind} at {feat.sample_rate} Hz are not supported (use whisper_log_mel at 16000 Hz)")
    if feat.n_mels != config.audio_layer.n_mels:
        raise _fail("bad_config", AURA_CONFIG,
                    f"features.n_mels={feat.n_mels} but audio_layer.n_mels={config.audio_layer.n_mels}; they must agree")
    if config.audio_layer.hidden_size != config.base_model.hidden_size:
        raise _fail("hidden_size_mismatch", AURA_CONFIG,
                    f"audio_layer.hidden_size={config.audio_layer.hidden_size} but the base model's is {config.base_model.hidden_size}")

    if base is not None:
        if config.base_model.hidden_size != base.hidden_size:
            raise _fail("hidden_size_mismatch", AURA_CONFIG,
                        f"built for hidden size {config.base_model.hidden_size}, but the served base model has {base.hidden_size}; "
                        "train the adapter for this base model")
        if config.base_model.fingerprint != base.fingerprint:
            raise _fail("base_model_mismatch", AURA_CONFIG,
                        f"built for base model '{config.base_model.name}' ({config.base_model.fingerprint}), but this server "
                        f"serves {base.fingerprint}; use an adapter trained on this base model")

    try:
        lora = read_json_file(path / LORA_CONFIG, max_bytes=MAX_LORA_CONFIG_BYTES)
    except AdapterFileError as e:
        raise _fail("bad_lora_config", LORA_CONFIG, f"{e.message}; re-save the adapter") from e
    if not isinstance(lora, dict) or lora.get("peft_type", "LORA") != "LORA":
        raise _fail("bad_lora_config", LORA_CONFIG, "peft_type must be LORA")
    rank = lora.get("r")
    if not isinstance(rank, int) or rank <= 0:
        raise _fail("bad_lora_config", LORA_CONFIG, f"'r' must be a positive integer, got {rank!r}")
    alpha = lora.get("lora_alpha", rank)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise _fail("bad_lora_config", LORA_CONFIG, f"'lora_alpha' must be a positive number, got {alpha!r}")
    rank_pattern = _pattern(lora, "rank_pattern", integer=True)
    _pattern(lora, "alpha_pattern", integer=False)
    top = max_lora_rank_of(lora)
    if max_lora_rank is not None and top > max_lora_rank:
        raise _fail("rank_too_large", LORA_CONFIG,
                    f"LoRA rank {top} exceeds this server's max_lora_rank {max_lora_rank}; retrain with a smaller rank or raise --max-lora-rank")
    if lora.get("bias", "none") not in ("none", None):
        raise _fail("bad_lora_config", LORA_CONFIG,
                    f"bias={lora.get('bias')!r} is not supported by the engine; train with bias='none'")
    layers_cfg = lora.get("layers_to_transform")
    if layers_cfg is not None:
        layers_list = [layers_cfg] if isinstance(layers_cfg, int) else layers_cfg
        n_layers = base.num_hidden_layers if base is not None else config.base_model.num_hidden_layers
        if not isinstance(layers_list, list) or any(not isinstance(i, int) or not 0 <= i < n_layers for i in layers_list):
            raise _fail("bad_lora_config", LORA_CONFIG,
                        f"layers_to_transform={layers_cfg!r} must list layer indices in [0, {n_layers})")
    if lora.get("use_dora"):
        raise _fail("bad_lora_config", LORA_CONFIG, "DoRA adapters are not supported by the engine; train plain LoRA")
    if lora.get("modules_to_save"):
        raise _fail("bad_lora_config", LORA_CONFIG, "modules_to_save is not supported; only LoRA A/B weights can be served")
    targets = lora.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise _fail("bad_lora_config", LORA_CONFIG, f"target_modules must be a list of module names, got {targets!r:.80}")
    if not targets:
        raise _fail("bad_lora_config", LORA_CONFIG, "target_modules is empty")
    if base is not None:
        unknown = [t for t in targets if t not in base.linear_modules]
        if unknown:
            raise _fail("unknown_target_modules", LORA_CONFIG,
                        f"target modules {unknown} do not exist in the base model (it has {list(base.linear_modules)})")

    header = safetensors_header(path / LORA_WEIGHTS, LORA_WEIGHTS)
    if not header:
        raise _fail("bad_lora_weights", LORA_WEIGHTS, "holds no tensors; save the PEFT LoRA weights (lora_A/lora_B) with safetensors")
    num_layers = base.num_hidden_layers if base is not None else config.base_model.num_hidden_layers
    for key, (shape, dtype) in header.items():
        m = _LORA_KEY.match(key)
        if m is None:
            raise _fail("bad_lora_weights", LORA_WEIGHTS, f"unexpected tensor '{key}'; expected PEFT LoRA names (…layers.N.<module>.lora_A/B.weight)")
        layer, module, ab = int(m.group(1)), m.group(2), m.group(3)
        if layer >= num_layers:
            raise _fail("bad_lora_weights", LORA_WEIGHTS, f"'{key}' is for layer {layer}, but the base model has {num_layers} layers")
        if module not in targets:
            raise _fail("bad_lora_weights", LORA_WEIGHTS, f"'{key}' targets '{module}', which adapter_config.json does not list")
        if dtype not in ("F32", "F16", "BF16"):
            raise _fail("bad_lora_weights", LORA_WEIGHTS, f"'{key}' has dtype {dtype}; LoRA weights must be float32/float16/bfloat16")
        if len(shape) != 2:
            raise _fail("bad_lora_weights", LORA_WEIGHTS, f"'{key}' has shape {list(shape)}; LoRA weights are 2-D")
        want = pattern_value(rank_pattern, _module_name(key)) or rank
        if (ab == "A" and shape[0] != want) or (ab == "B" and shape[1] != want):
            raise _fail("bad_lora_weights", LORA_WEIGHTS, f"'{key}' has shape {list(shape)}, which does not match rank {want}")
        if base is not None and module in base.linear_shapes:
            out_f, in_f = base.linear_shapes[module]
            if (ab == "A" and shape[1] != in_f) or (ab == "B" and shape[0] != out_f):
                raise _fail("bad_lora_weights", LORA_WEIGHTS,
                            f"'{key}' has shape {list(shape)}, which does not fit {module} ({out_f}x{in_f}) of the base model")

    pairs: dict[str, set[str]] = {}
    for key in header:
        m = _LORA_KEY.match(key)
        assert m is not None
        stem = key[: m.start(3) - len("lora_")]
        pairs.setdefault(stem, set()).add(m.group(3))
    lonely = sorted(stem for stem, ab in pairs.items() if ab != {"A", "B"})
    if lonely:
        raise _fail("bad_lora_weights", LORA_WEIGHTS,
                    f"'{lonely[0]}' has lora_A without lora_B (or the reverse); every adapted module needs both")

    audio_header = safetensors_header(path / AUDIO_WEIGHTS, AUDIO_WEIGHTS)
    expected = audio_layer_shapes(config.audio_layer)  # meta device: declared sizes cost no memory
    missing = sorted(set(expected) - set(audio_header))
    extra = sorted(set(audio_header) - set(expected))
    if missing or extra:
        raise _fail("bad_audio_weights", AUDIO_WEIGHTS,
                    f"tensors do not match the declared audio layer (missing {missing}, unexpected {extra})")
    for key, want in expected.items():
        shape, dtype = audio_header[key]
        if shape != want:
            raise _fail("bad_audio_weights", AUDIO_WEIGHTS,
                        f"'{key}' has shape {list(shape)}, but aura_config.json's audio_layer declares {list(want)}")
        if dtype not in ("F32", "F16", "BF16"):
            raise _fail("bad_audio_weights", AUDIO_WEIGHTS, f"'{key}' has dtype {dtype}; expected a float type")
    return config
