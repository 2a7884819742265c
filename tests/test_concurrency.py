"""Concurrent streams over two adapters share vLLM batches without changing anyone's output."""

from __future__ import annotations

import asyncio

import httpx

from sse import parse_sse


async def _stream(client: httpx.AsyncClient, wav: bytes, adapter: str) -> list[int]:
    async with client.stream("POST", "/v1/audio/chat", files={"file": ("q.wav", wav)},
                             data={"adapter": adapter, "stream": "true", "max_tokens": "16",
                                   "return_token_ids": "true"}) as r:
        assert r.status_code == 200
        s = parse_sse([line async for line in r.aiter_lines()])
    assert s.done and s.error is None
    return s.token_ids


async def test_sixteen_concurrent_streams_match_solo_runs(server, speech):
    clips = {k: open(p, "rb").read() for k, p in speech.items()}
    jobs = [(clip, adapter) for clip in clips for adapter in ("alpha", "beta")] * 2  # 16
    async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
        solo = {}
        for clip, adapter in set(jobs):
            solo[(clip, adapter)] = await _stream(client, clips[clip], adapter)
        together = await asyncio.gather(*(_stream(client, clips[c], a) for c, a in jobs))
    for (clip, adapter), tokens in zip(jobs, together):
        assert tokens == solo[(clip, adapter)], f"{clip}/{adapter} changed under concurrency"
    assert len({tuple(v) for v in solo.values()}) > 1
