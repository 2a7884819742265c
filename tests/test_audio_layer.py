"""The audio layer's transformer blocks, causal or with lookahead: batching, growing audio (up to the lookahead)
and chunking never change a clip's vectors; declared sizes are bounded; the FLOPs it reports are the FLOPs it does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch.utils.flop_counter import FlopCounterMode

import adapters.audio_layer as audio_layer
from adapters.adapter import AuraConfig, BaseModelRef
from adapters.audio_layer import AudioEmbedding, AudioLayerConfig, EncoderMerge


def _layer(blocks: int, seed: int = 0, lookahead: int = 0, stride: int = 1, merge: EncoderMerge = "mean",
           trained_merge: bool = True) -> AudioEmbedding:
    """Four stem frames per token whatever the stride: the stride pools, the stacking takes the rest. A linear merge
    gets random weights unless ``trained_merge`` is False (fresh, it is the mean, which would hide its own bugs)."""
    torch.manual_seed(seed)
    cfg = AudioLayerConfig(n_mels=80, conv_channels=32, stack_factor=4 // stride, hidden_size=48,
                           encoder_layers=blocks, encoder_heads=4, encoder_lookahead=lookahead, encoder_stride=stride,
                           encoder_merge=merge)
    layer = AudioEmbedding(cfg).eval()
    if layer.merge is not None and trained_merge:
        with torch.no_grad():
            layer.merge.weight.add_(torch.randn_like(layer.merge.weight) * 0.2)
            layer.merge.bias.normal_(0.0, 0.1)
    return layer


@pytest.mark.parametrize(("lookahead", "stride", "merge"), [(0, 1, "mean"), (5, 1, "mean"), (0, 2, "mean"),
                                                             (2, 2, "mean"), (2, 2, "linear"), (1, 4, "linear")])
@torch.inference_mode()
def test_a_clip_gets_the_same_vectors_alone_in_a_batch_and_as_its_audio_grows(lookahead: int, stride: int,
                                                                              merge: EncoderMerge) -> None:
    layer = _layer(2, lookahead=lookahead, stride=stride, merge=merge)
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
    # token, the conv stem's one-frame look-ahead and the blocks' lookahead: of the prefix's 600 stem frames, 0..598
    # see nothing past it; block frames (stride s) 0..599 // s - 1 hold only those, and 0..599 // s - 1 - k see nothing
    # past them, so tokens (stack_factor block frames each) up to there are final: 0..(595 - k) // 4 at stride 1
    prefix, _ = layer(long[:, :, :1200], torch.tensor([1200]))
    stack = layer.config.stack_factor
    final = (599 // stride - 1 - lookahead - (stack - 1)) // stack + 1
    torch.testing.assert_close(prefix[0, :final], alone_long[0, :final], rtol=1e-5, atol=1e-5)
    # (random blocks attend diffusely: one frame moves the next token by 6e-5 to 3e-2, where the final ones differ
    # by at most 2e-6, float32's noise here)
    assert (prefix[0, final] - alone_long[0, final]).abs().max() > 2e-5, "the next token should still move"


@torch.inference_mode()
@pytest.mark.parametrize(("lookahead", "stride", "merge"), [(0, 1, "mean"), (5, 1, "mean"), (3, 2, "mean"),
                                                             (3, 2, "linear")])
def test_chunked_attention_equals_one_pass_and_is_causal(lookahead: int, stride: int, merge: EncoderMerge,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    layer = _layer(1, lookahead=lookahead, stride=stride, merge=merge)
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
    with pytest.raises(ValidationError, match="encoder_stride pools frames for the blocks"):
        AudioLayerConfig(n_mels=80, conv_channels=64, hidden_size=48, encoder_stride=2)
    with pytest.raises(ValidationError, match="encoder_merge='linear' .* needs encoder_stride > 1"):
        AudioLayerConfig(n_mels=80, conv_channels=64, hidden_size=48, encoder_layers=1, encoder_heads=4,
                         encoder_merge="linear")
    with pytest.raises(ValidationError):
        AudioLayerConfig(n_mels=80, conv_channels=64, hidden_size=48, encoder_layers=1,
                         encoder_stride=audio_layer.MAX_ENCODER_STRIDE + 1)
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


@pytest.mark.parametrize(("blocks", "lookahead", "stride", "merge"),
                         [(0, 0, 1, "mean"), (2, 0, 1, "mean"), (2, 7, 1, "mean"), (2, 3, 2, "mean"), (1, 0, 4, "mean"),
                          (2, 3, 2, "linear"), (1, 0, 4, "linear")])
@pytest.mark.parametrize("frames", [300, 1101])
def test_reported_flops_are_the_flops_it_does(blocks: int, lookahead: int, stride: int, merge: EncoderMerge, frames: int,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    layer = _layer(blocks, lookahead=lookahead, stride=stride, merge=merge)
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


@torch.inference_mode()
def test_a_stride_averages_each_clips_own_frames_and_divides_the_blocks_cost() -> None:
    """Stride 2 hands the blocks the mean of each pair of stem frames (a partial last pair: its one frame), at
    the same token count as stride 1 with twice the stacking, and costs the blocks about half."""
    x = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    pooled, lengths = audio_layer.mean_pool(x, torch.tensor([5, 3]), 2)
    assert lengths.tolist() == [3, 2]
    torch.testing.assert_close(pooled[0], torch.stack([x[0, 0:2].mean(0), x[0, 2:4].mean(0), x[0, 4]]))
    torch.testing.assert_close(pooled[1], torch.stack([x[1, 0:2].mean(0), x[1, 2], torch.zeros(3)]))
    plain, strided = _layer(2), _layer(2, stride=2)
    frames = torch.randn(1, 80, 1000)
    (a, na), (b, nb) = plain(frames, torch.tensor([1000])), strided(frames, torch.tensor([1000]))
    assert a.shape == b.shape and na.tolist() == nb.tolist() == [125]
    assert plain.config.num_tokens(1000) == strided.config.num_tokens(1000) == 125
    stem_only = _layer(0).config.flops(1000)
    blocks_plain, blocks_strided = plain.config.flops(1000) - stem_only, strided.config.flops(1000) - stem_only
    # per-frame work halves, attention quarters (the projection shrinks too): between a quarter and a half
    assert 0.25 < blocks_strided / blocks_plain < 0.5


@torch.inference_mode()
def test_a_linear_merge_starts_as_the_mean_and_learns_the_order_a_mean_forgets() -> None:
    """Fresh, encoder_merge: linear gives the mean layer's vectors (so a run starts where the mean arm does); with
    learned weights, swapping the two stem frames of a pair moves the vectors, which a mean cannot see."""
    mean, fresh = _layer(2, stride=2, lookahead=2), _layer(2, stride=2, lookahead=2, merge="linear", trained_merge=False)
    missing, unexpected = fresh.load_state_dict(mean.state_dict(), strict=False)
    assert missing == ["merge.weight", "merge.bias"] and not unexpected
    frames = torch.randn(1, 80, 400)  # 200 stem frames: whole pairs
    torch.testing.assert_close(fresh(frames, torch.tensor([400]))[0], mean(frames, torch.tensor([400]))[0],
                               rtol=1e-5, atol=1e-5)
    learned = _layer(2, stride=2, lookahead=2, merge="linear")
    stem = torch.randn(1, 6, 32)
    swapped = stem[:, [1, 0, 2, 3, 4, 5]]
    merged, n = learned._pool(stem, torch.tensor([6]))
    assert n.tolist() == [3] and (merged[0, 0] - learned._pool(swapped, torch.tensor([6]))[0][0, 0]).abs().max() > 1e-3
    torch.testing.assert_close(mean._pool(stem, torch.tensor([6]))[0], mean._pool(swapped, torch.tensor([6]))[0])


class _FirstFormatLayer(BaseModel):
    """The audio layer as the format's first servers declared it (the shipped demo adapter's keys), forbidding the rest."""

    model_config = ConfigDict(extra="forbid")
    stem: str
    n_mels: int
    conv_channels: int
    stack_factor: int
    hidden_size: int


def test_an_adapter_without_the_newer_parts_still_loads_on_an_older_server() -> None:
    """Keys added later are written only where they change the layer: a plain layer's JSON is the first format's (an
    older server loads it, as a rolling upgrade needs); a layer with blocks says so, and that server refuses it rather
    than misread it. Either way the JSON reads back to the same layer."""
    demo = json.loads((Path(__file__).parents[1] / "adapters" / "demo_adapter" / "aura_config.json").read_text())
    plain = AudioLayerConfig(hidden_size=576)
    assert json.loads(plain.model_dump_json()) == demo["audio_layer"]
    _FirstFormatLayer.model_validate_json(plain.model_dump_json())
    strided = AudioLayerConfig(hidden_size=576, encoder_layers=2, encoder_lookahead=2, encoder_stride=4, stack_factor=1,
                               encoder_merge="linear")
    written = json.loads(strided.model_dump_json())
    assert {k: written[k] for k in audio_layer.LATER_KEYS if k in written} == {
        "encoder_layers": 2, "encoder_lookahead": 2, "encoder_stride": 4, "encoder_merge": "linear"}
    with pytest.raises(ValidationError, match="encoder_layers"):
        _FirstFormatLayer.model_validate_json(strided.model_dump_json())
    for layer in (plain, strided):
        assert AudioLayerConfig.model_validate_json(layer.model_dump_json()) == layer
