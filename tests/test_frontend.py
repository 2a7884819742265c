"""The audio front end batches bursts per adapter without changing any clip's vectors."""

from __future__ import annotations

import asyncio

import pytest
import torch

from adapters.adapter import load_adapter
from adapters.audio import load_audio_file
from server.frontend import AudioFrontend


@pytest.mark.parametrize("name", ["alpha", "beta"])  # beta's audio layer has a causal attention block
async def test_burst_is_batched_and_batching_changes_nothing(tiny, speech, name):
    adapter = load_adapter(tiny.adapters[name])
    clips = [load_audio_file(p).samples for p in speech.values()]  # different lengths
    frontend = AudioFrontend(max_batch=16, window_ms=50)
    try:
        solo = [(await frontend.embed(adapter, c))[0] for c in clips]
        burst = await asyncio.gather(*(frontend.embed(adapter, c) for c in clips * 3))
    finally:
        frontend.close()
    sizes = [t.batch_size for _, t in burst]
    assert sizes[0] == 1, "an idle front end must not hold the first clip back"
    assert max(sizes) > 1, "clips arriving while a batch runs must share the next batch"
    for i, (vectors, _) in enumerate(burst):
        ref = solo[i % len(clips)]
        assert vectors.shape == ref.shape
        torch.testing.assert_close(vectors, ref, rtol=1e-4, atol=1e-5)


async def test_adapters_are_never_mixed_in_a_batch(tiny, speech):
    a, b = load_adapter(tiny.adapters["alpha"]), load_adapter(tiny.adapters["beta"])
    clip = load_audio_file(speech["capital"]).samples
    frontend = AudioFrontend(max_batch=16, window_ms=50)
    try:
        va, vb = await asyncio.gather(frontend.embed(a, clip), frontend.embed(b, clip))
        alone_a, alone_b = (await frontend.embed(a, clip))[0], (await frontend.embed(b, clip))[0]
    finally:
        frontend.close()
    # beta's strided block gives the clip half alpha's tokens; each adapter's vectors are its own, as alone
    assert vb[0].shape[0] == -(-va[0].shape[0] // 2)
    torch.testing.assert_close(va[0], alone_a)
    torch.testing.assert_close(vb[0], alone_b)
