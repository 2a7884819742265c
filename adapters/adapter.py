"""The AuRA adapter directory: a PEFT LoRA folder plus the audio embedding layer.

```
<adapter>/
  adapter_config.json          PEFT LoRA config     } vLLM loads these two as they are
  adapter_model.safetensors    PEFT LoRA weights    }
  aura_config.json             AuraConfig below
  audio_embedding.safetensors  AudioEmbedding state dict
```
The LoRA and the audio layer are one unit: they are saved, checksummed, validated and loaded
together, so a server can never pair one version's LoRA with another's audio layer.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors.torch import load_file, save_file

from adapters.atomic_dir import atomic_dir
from adapters.audio_layer import AudioEmbedding, AudioLayerConfig, EncoderMerge, embedding_rms
from adapters.bounded_json import JSONLimitError, JSONValue, check_shape, loads
from adapters.base_model import BaseModelInfo, read_base_model
from adapters.features import FeatureConfig
from adapters.prompt import DEFAULT_TRANSCRIBE_PROMPT, PromptLayout

T = TypeVar("T")

FORMAT_VERSION = 1
AURA_CONFIG = "aura_config.json"
AUDIO_WEIGHTS = "audio_embedding.safetensors"
LORA_CONFIG = "adapter_config.json"
LORA_WEIGHTS = "adapter_model.safetensors"
CHECKSUMMED = (LORA_CONFIG, LORA_WEIGHTS, AUDIO_WEIGHTS)

# Bounds on what an adapter's JSON may declare, checked before any module is built or any
# weight is read: aura_config.json is not covered by the checksums, so its sizes are a caller's
# word. The audio layer's cost grows with conv_channels squared (and conv_channels x stack x
# hidden for the projection); Whisper large uses 1280 channels and 128 mels.
MAX_CONFIG_BYTES = 1024 * 1024  # aura_config.json (the demo's, with its loss history: 18 KB)
MAX_LORA_CONFIG_BYTES = 64 * 1024  # adapter_config.json
MAX_JSON_DEPTH = 16
MAX_JSON_NODES = 100_000
MAX_TRAINING_BYTES = 256 * 1024  # the ``training`` provenance, serialised
MAX_TRAINING_NODES = 20_000
MAX_TRAINING_DEPTH = 8
MAX_CONV_CHANNELS = 4096
MAX_N_MELS = 256
MAX_N_FFT = 8192
MAX_AUDIO_PARAMS = 64 * 1024 * 1024  # 256 MB in fp32: far above any real stem, far below a bomb


# The adapter shipped in this package and served by default (the server, the benchmarks and the diagnostics use it).
DEMO_ADAPTER_DIR = Path(__file__).resolve().parent / "demo_adapter"


class AdapterFileError(ValueError):
    """An adapter JSON file is unreadable or over a limit; ``file`` names it."""

    def __init__(self, file: str, message: str) -> None:
        super().__init__(f"{file}: {message}")
        self.file = file
        self.message = message


def read_json_file(path: Path, *, max_bytes: int, max_depth: int = MAX_JSON_DEPTH,
                   max_nodes: int = MAX_JSON_NODES) -> JSONValue:
    """Read an adapter's JSON file with every limit applied (size before reading it whole)."""
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    try:
        return loads(data, max_bytes=max_bytes, max_depth=max_depth, max_nodes=max_nodes)
    except JSONLimitError as e:
        raise AdapterFileError(Path(path).name, e.message) from None


class BaseModelRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    fingerprint: str
    architecture: str
    hidden_size: int
    num_hidden_layers: int
    vocab_size: int


class AuraConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    base_model: BaseModelRef
    features: FeatureConfig = Field(default_factory=FeatureConfig)
    audio_layer: AudioLayerConfig
    prompt: PromptLayout = Field(default_factory=PromptLayout)
    trained: bool = False
    training: dict[str, Any] = Field(default_factory=dict, description="Provenance: data, steps, losses, teacher.")
    files: dict[str, str] = Field(default_factory=dict, description="sha256 of each weight/config file.")

    @model_validator(mode="after")
    def _bounded(self) -> "AuraConfig":
        """Sizes a hostile config could inflate are capped before anything is built from them."""
        layer, feat = self.audio_layer, self.features
        if layer.conv_channels > MAX_CONV_CHANNELS:
            raise ValueError(f"audio_layer.conv_channels={layer.conv_channels} exceeds {MAX_CONV_CHANNELS}")
        if layer.n_mels > MAX_N_MELS or feat.n_mels > MAX_N_MELS:
            raise ValueError(f"n_mels exceeds {MAX_N_MELS}")
        if feat.n_fft > MAX_N_FFT or feat.hop_length > MAX_N_FFT:
            raise ValueError(f"features.n_fft and hop_length must be at most {MAX_N_FFT}")
        if self.base_model.hidden_size > 65536 or layer.hidden_size > 65536:
            raise ValueError("hidden_size exceeds 65536")
        params = audio_layer_params(layer)
        if params > MAX_AUDIO_PARAMS:
            raise ValueError(f"the declared audio layer has {params} parameters; the limit is {MAX_AUDIO_PARAMS}")
        try:
            check_shape(self.training, max_depth=MAX_TRAINING_DEPTH, max_nodes=MAX_TRAINING_NODES)
        except JSONLimitError as e:
            raise ValueError(f"training: {e.message}") from None
        if len(json.dumps(self.training, default=str)) > MAX_TRAINING_BYTES:
            raise ValueError(f"training: the provenance is larger than {MAX_TRAINING_BYTES} bytes")
        return self


def audio_layer_shapes(layer: AudioLayerConfig) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of the declared audio layer, built on the meta device: no memory, whatever it declares."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in AudioEmbedding(layer).state_dict().items()}


def audio_layer_params(layer: AudioLayerConfig) -> int:
    total = 0
    for shape in audio_layer_shapes(layer).values():
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class AuraAdapter:
    """A loaded adapter: its config, its audio layer (eval mode) and where its LoRA lives."""

    name: str
    path: Path
    config: AuraConfig
    audio_layer: AudioEmbedding
    lora_rank: int
    lora_alpha: float
    target_modules: tuple[str, ...]

    @property
    def trained(self) -> bool:
        return self.config.trained

    @property
    def transcribe_prompt(self) -> str:
        """The prompt this adapter learned to transcribe with (what ``/v1/audio/transcriptions`` sends)."""
        recorded = self.config.training.get("transcribe_prompt")
        return recorded if isinstance(recorded, str) and recorded else DEFAULT_TRANSCRIBE_PROMPT


def read_aura_config(path: Path) -> AuraConfig:
    return AuraConfig.model_validate(read_json_file(Path(path) / AURA_CONFIG, max_bytes=MAX_CONFIG_BYTES))


def load_adapter(path: str | Path, name: str | None = None, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> AuraAdapter:
    """Load an adapter directory that has already passed validation."""
    path = Path(path).resolve()
    config = read_aura_config(path)
    lora = read_json_file(path / LORA_CONFIG, max_bytes=MAX_LORA_CONFIG_BYTES)
    assert isinstance(lora, dict)  # validate_adapter checked it
    layer = AudioEmbedding(config.audio_layer)
    layer.load_state_dict(load_file(str(path / AUDIO_WEIGHTS)))
    layer.to(device=device, dtype=dtype).eval().requires_grad_(False)
    targets = lora.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    return AuraAdapter(
        name=name or path.name,
        path=path,
        config=config,
        audio_layer=layer,
        lora_rank=max_lora_rank_of(lora),
        lora_alpha=float(lora.get("lora_alpha", lora["r"])),
        target_modules=tuple(targets),
    )


def save_adapter(
    out_dir: str | Path,
    *,
    config: AuraConfig,
    audio_layer: AudioEmbedding,
    lora_dir: str | Path | None = None,
    peft_model: Any = None,
) -> Path:
    """Write an adapter directory atomically (:func:`adapters.atomic_dir.atomic_dir`), with per-file checksums.

    The LoRA comes either from a PEFT model (``save_pretrained``) or from a folder that already
    holds ``adapter_config.json`` + ``adapter_model.safetensors``.
    """
    with atomic_dir(out_dir, overwrite=True) as tmp:
        if peft_model is not None:
            peft_model.save_pretrained(str(tmp), safe_serialization=True)
            # PEFT may nest under the adapter name when it is not "default".
            for f in (LORA_CONFIG, LORA_WEIGHTS):
                if not (tmp / f).exists():
                    nested = next(tmp.glob(f"*/{f}"), None)
                    if nested is not None:
                        shutil.move(str(nested), tmp / f)
        elif lora_dir is not None:
            for f in (LORA_CONFIG, LORA_WEIGHTS):
                shutil.copy2(Path(lora_dir) / f, tmp / f)
        else:
            raise ValueError("save_adapter needs peft_model or lora_dir")
        for extra in tmp.iterdir():
            if extra.is_dir():
                shutil.rmtree(extra)
            elif extra.name not in (LORA_CONFIG, LORA_WEIGHTS):
                extra.unlink()
        state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in audio_layer.state_dict().items()}
        save_file(state, str(tmp / AUDIO_WEIGHTS), metadata={"format": "pt"})
        files = {f: sha256_file(tmp / f) for f in CHECKSUMMED}
        config = config.model_copy(update={"files": files})
        (tmp / AURA_CONFIG).write_text(config.model_dump_json(indent=2) + "\n")
    return Path(out_dir)


def base_model_ref(info: BaseModelInfo, name: str | None = None) -> BaseModelRef:
    return BaseModelRef(
        name=name or Path(info.path).name,
        fingerprint=info.fingerprint,
        architecture=info.architecture,
        hidden_size=info.hidden_size,
        num_hidden_layers=info.num_hidden_layers,
        vocab_size=info.vocab_size,
    )


DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# rank_pattern / alpha_pattern keys: PEFT and vLLM read each key as a regular expression, so a key is limited to
# module-name characters ('.' is the only metacharacter left: a fixed-length pattern that cannot backtrack badly)
PATTERN_KEY = re.compile(r"^[A-Za-z0-9_.]{1,256}$")
MAX_PATTERN_KEYS = 4096


def pattern_value(pattern: dict[str, T], module_name: str) -> T | None:
    """PEFT's rule for ``rank_pattern`` / ``alpha_pattern`` (vLLM's too): the first key that matches the end of the
    module's name at a '.' boundary wins; None when none does."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return None


def max_lora_rank_of(lora: dict[str, JSONValue]) -> int:
    """The largest rank of a validated adapter_config.json: ``r`` or a ``rank_pattern`` value (what an engine's
    max_lora_rank must cover)."""
    pattern = lora.get("rank_pattern") or {}
    values = pattern.values() if isinstance(pattern, dict) else ()
    return max(r for r in (lora["r"], *values) if isinstance(r, int))


def new_lora_config(base: BaseModelInfo, *, rank: int, alpha: float, target_modules: tuple[str, ...],
                    layers: list[int] | None = None, rank_layers: dict[int, int] | None = None) -> Any:
    """A PEFT LoraConfig; ``rank_layers`` (block -> rank) gives those blocks' modules another rank through PEFT's
    ``rank_pattern`` (one exact module name per key, which vLLM serves as PEFT trains it). Their ``alpha_pattern`` is
    ``alpha * sqrt(r_block / rank)``: with a fixed scale, Adam's first updates of B @ A grow as sqrt(rank), so a
    rank-128 block would learn ~2.8x faster than rank 16 beside it; this keeps scale * sqrt(rank) equal (rsLoRA's
    rule), i.e. more directions at the same step size."""
    from peft import LoraConfig

    missing = [t for t in target_modules if t not in base.linear_modules]
    if missing:
        raise ValueError(
            f"LoRA targets {missing} are not linear modules of {base.architecture} "
            f"(it has {list(base.linear_modules)})"
        )
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for layer, r in sorted((rank_layers or {}).items()):
        if not 0 <= layer < base.num_hidden_layers:
            raise ValueError(f"LoRA rank for block {layer}: the base model has blocks 0..{base.num_hidden_layers - 1}")
        if r < 1:
            raise ValueError(f"LoRA rank for block {layer} must be at least 1, got {r}")
        for t in target_modules:
            rank_pattern[base.module_name(layer, t)] = r
            alpha_pattern[base.module_name(layer, t)] = alpha * math.sqrt(r / rank)
    return LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(target_modules),
        layers_to_transform=layers, bias="none", task_type="CAUSAL_LM",
        rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
    )


def init_adapter(
    base_model: str | Path,
    out_dir: str | Path,
    *,
    rank: int = 8,
    alpha: float = 16.0,
    target_modules: tuple[str, ...] = DEFAULT_TARGETS,
    features: FeatureConfig | None = None,
    conv_channels: int = 384,
    stack_factor: int = 4,
    encoder_layers: int = 0,
    encoder_heads: int = 6,
    prompt: PromptLayout | None = None,
    seed: int = 0,
    lora_init_std: float = 0.0,
    base_name: str | None = None,
    rank_layers: dict[int, int] | None = None,
    encoder_lookahead: int = 0,
    encoder_stride: int = 1,
    encoder_merge: EncoderMerge = "mean",
) -> Path:
    """Create a fresh (untrained) adapter for ``base_model``.

    ``lora_init_std`` > 0 makes LoRA B non-zero, so two fresh adapters really change the model
    differently (tests need that); 0 is PEFT's no-op start, the right start for training.
    """
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    base = read_base_model(base_model)
    features = features or FeatureConfig()
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_model), dtype=torch.float32)
    peft_model = get_peft_model(model, new_lora_config(base, rank=rank, alpha=alpha, target_modules=target_modules,
                                                                rank_layers=rank_layers))
    if lora_init_std > 0:
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=gen) * lora_init_std)
    layer_cfg = AudioLayerConfig(n_mels=features.n_mels, conv_channels=conv_channels, stack_factor=stack_factor,
                                 hidden_size=base.hidden_size, encoder_layers=encoder_layers, encoder_heads=encoder_heads,
                                 encoder_lookahead=encoder_lookahead, encoder_stride=encoder_stride,
                                 encoder_merge=encoder_merge)
    layer = AudioEmbedding(layer_cfg)
    layer.match_output_scale(embedding_rms(model))
    config = AuraConfig(
        base_model=base_model_ref(base, base_name),
        features=features,
        audio_layer=layer_cfg,
        prompt=prompt or PromptLayout(),
        trained=False,
        training={"kind": "initialised", "seed": seed, "lora_init_std": lora_init_std},
    )
    return save_adapter(out_dir, config=config, audio_layer=layer, peft_model=peft_model)
