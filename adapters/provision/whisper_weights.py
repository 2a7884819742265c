"""CTranslate2 Whisper tensors <-> transformers Whisper parameters: names, state dict, config.

Pure mapping, no files: :mod:`adapters.provision.ct2_whisper` feeds it what
:mod:`adapters.provision.ct2_reader` read, and tests use the inverse map to write CTranslate2 files.
"""

from __future__ import annotations

import re
import sys
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

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
