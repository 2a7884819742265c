"""The audio layer's transformer blocks, causal or with lookahead: batching, growing audio (up to the lookahead)
and chunking never change a clip's vectors; declared sizes are bounded; the FLOPs it reports are the FLOPs it does."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch.utils.flop_counter import FlopCounterMode

import adapters.audio_layer as audio_layer
from adapters.adapter import AuraConfig, BaseModelRef
from adapters.audio_layer import AudioEmbedding, AudioLayerConfig


def _layer(blocks: int, seed: int = 0, lookahead: int = 0) -> AudioEmbedding:
    torch.manual_seed(seed)
    cfg = AudioLayerConfig(n_mels=80, conv_channels=32, stack_factor=4, hidden_size=48,
                           encoder_layers=blocks, encoder_heads=4, encoder_lookahead=lookahead)
    return AudioEmbedding(cfg).eval()


@pytest.mark.parametrize("lookahead", [0, 5])
@torch.inference_mode()
def test_a_clip_gets_the_same_vectors_alone_in_a_batch_and_as_its_audio_grows(lookahead: int) -> None:
    layer = _layer(2, lookahead=lookahead)
    g = torch.Generator().manual_seed(1)
    long = torch.randn(1, 80, 1301, generator=g)  # 651 stem frames: more than one attention chunk
    short = torch.randn(1, 80, 350, generator=g)
    batch = torch.zeros(2, 80, 1301)
    batch[0], batch[1, :, :350] = long[0], short[0]
    vectors, tokens = layer(batch, torch.tensor([1301, 350]))
    alone_long, n_long = layer(long, torch.tensor([1301]))
    alone_short, n_short = layer(short, torch.tensor([350]))
    assert tokens.tolist() == [n_long.item(), n_short.item()] == [163, 44]
    torch.testing.assert_close(vectors[0, :163], alone_long[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vectors[1, :44], alone_short[0], rtol=1e-5, atol=1e-5)
    # realtime prefill relies on this: earlier audio vectors never depend on later audio, but for the last, partial
    # token, the conv stem's one-frame look-ahead and the blocks' lookahead: of the prefix's 600 stem frames, 0..598-k
    # see nothing past it, so its tokens 0..(595-k)//4 are final
    prefix, _ = layer(long[:, :, :1200], torch.tensor([1200]))
    final = (595 - lookahead) // 4 + 1
    torch.testing.assert_close(prefix[0, :final], alone_long[0, :final], rtol=1e-5, atol=1e-5)
    # (random blocks attend diffusely: one frame moves the next token by ~5e-4, fifty times float32's noise here)
    assert (prefix[0, final] - alone_long[0, final]).abs().max() > 1e-4, "the next token should still move"


@torch.inference_mode()
@pytest.mark.parametrize("lookahead", [0, 5])
def test_chunked_attention_equals_one_pass_and_is_causal(lookahead: int, monkeypatch: pytest.MonkeyPatch) -> None:
    layer = _layer(1, lookahead=lookahead)
    x = torch.randn(2, 80, 300)
    lengths = torch.tensor([300, 211])
    whole, _ = layer(x, lengths)
    monkeypatch.setattr(audio_layer, "ATTENTION_CHUNK", 7)  # many chunks, boundaries inside every token
    chunked, _ = layer(x, lengths)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
    # the blocks really attend: a change to early audio reaches later vectors (a stem alone could not)
    bumped = x.clone()
    bumped[:, :, :8] += 3.0
    moved, _ = layer(bumped, lengths)
    assert (moved[0, 20:] - whole[0, 20:]).abs().max() > 1e-3


def test_declared_blocks_are_bounded() -> None:
    with pytest.raises(ValidationError, match="must divide"):
        AudioLayerConfig(n_mels=80, conv_channels=64, hidden_size=48, encoder_layers=1, encoder_heads=6)
    with pytest.raises(ValidationError):
        AudioLayerConfig(n_mels=80, conv_channels=64, hidden_size=48, encoder_layers=audio_layer.MAX_ENCODER_LAYERS + 1)
    # a hostile aura_config.json declaring 12 blocks of width 4096 (~2.4G parameters) is refused before anything is built
    ref = BaseModelRef(name="x", fingerprint="sha256:0", architecture="LlamaForCausalLM", hidden_size=48,
                       num_hidden_layers=2, vocab_size=100)
    huge = AudioLayerConfig(n_mels=80, conv_channels=4096, hidden_size=48, encoder_layers=12, encoder_heads=32)
    with pytest.raises(ValidationError, match="parameters"):
        AuraConfig(base_model=ref, audio_layer=huge)


def _explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention as plain matrix products, which the FLOP counter sees."""
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return scores.masked_fill(~attn_mask, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize(("blocks", "lookahead"), [(0, 0), (2, 0), (2, 7)])
@pytest.mark.parametrize("frames", [300, 1101])
def test_reported_flops_are_the_flops_it_does(blocks: int, lookahead: int, frames: int,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    layer = _layer(blocks, lookahead=lookahead)
    x, lengths = torch.randn(1, 80, frames), torch.tensor([frames])
    with torch.inference_mode():
        expected, _ = layer(x, lengths)
    # one query per attention call: each frame's products over exactly the frames it may see
    monkeypatch.setattr(audio_layer, "ATTENTION_CHUNK", 1)
    monkeypatch.setattr(audio_layer.F, "scaled_dot_product_attention", _explicit_attention)
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        got, _ = layer(x, lengths)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert layer.config.flops(frames) == pytest.approx(counter.get_total_flops(), rel=1e-3)
