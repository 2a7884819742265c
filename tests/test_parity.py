"""What is trained is what is served: vLLM's tokens equal the plain-PyTorch reference's."""

from __future__ import annotations

import pytest

from server.context import RequestContext
from server.serving import AudioInput, ChatJob, collect
from test_serving_api import post_audio

MAX_TOKENS = 24


async def reference_tokens(state, adapter: str, wav, prompt: str | None = None) -> list[int]:
    parts = [AudioInput(open(wav, "rb").read())] + ([prompt] if prompt else [])
    job = ChatJob(adapter=adapter, turns=[("user", parts)], max_tokens=MAX_TOKENS, return_token_ids=True)
    # The served pipeline itself (admit, lease, front end, engine), on the reference engine.
    done = await collect(state.service.run(job, RequestContext.local(600)))
    return done.token_ids


@pytest.mark.parametrize("adapter", ["alpha", "beta"])
@pytest.mark.parametrize("clip", ["capital", "spider"])
async def test_vllm_matches_reference(server, reference, speech, adapter, clip):
    served = post_audio(server.url, speech[clip], adapter=adapter, max_tokens=MAX_TOKENS,
                        return_token_ids=True).json()["choices"][0]["token_ids"]
    oracle = await reference_tokens(reference, adapter, speech[clip])
    assert len(served) == MAX_TOKENS
    assert served == oracle


async def test_parity_with_text_prompt(server, reference, speech):
    served = post_audio(server.url, speech["sky"], adapter="beta", max_tokens=MAX_TOKENS, prompt="Be brief.",
                        return_token_ids=True).json()["choices"][0]["token_ids"]
    assert served == await reference_tokens(reference, "beta", speech["sky"], "Be brief.")


async def test_adapter_and_audio_both_matter(reference, speech):
    """Guards the parity tests against passing vacuously (e.g. audio or LoRA silently ignored)."""
    a = await reference_tokens(reference, "alpha", speech["capital"])
    b = await reference_tokens(reference, "beta", speech["capital"])
    c = await reference_tokens(reference, "alpha", speech["spider"])
    assert a != b
    assert a != c
