"""The Python SDK against the real server: sync, async, streaming, and server errors."""

from __future__ import annotations

import pytest

from clients import AsyncAuraClient, AuraClient, AuraError


def test_sync_client_stream_equals_non_stream(server, speech):
    with AuraClient(server.url) as client:
        done = client.chat(speech["capital"], adapter="alpha", max_tokens=8)
        streamed = "".join(client.chat_stream(speech["capital"], adapter="alpha", max_tokens=8))
        assert done.text and streamed == done.text
        assert done.usage["completion_tokens"] == 8 and done.model == "alpha"
        assert {"alpha", "beta"} <= {m["id"] for m in client.models()}


async def test_async_client(server, speech):
    async with AsyncAuraClient(server.url) as client:
        done = await client.chat(speech["spider"].read_bytes(), adapter="beta", max_tokens=6)
        pieces = [p async for p in client.chat_stream(speech["spider"], adapter="beta", max_tokens=6)]
        assert "".join(pieces) == done.text


def test_server_errors_surface_with_code(server, speech):
    with AuraClient(server.url) as client, pytest.raises(AuraError) as e:
        client.chat(speech["capital"], adapter="no-such-adapter")
    assert e.value.status == 404 and e.value.code == "adapter_not_found" and "GET /v1/models" in e.value.message
    with AuraClient(server.url) as client, pytest.raises(AuraError) as e:
        list(client.chat_stream(b"not audio" * 50))
    assert e.value.status == 415
