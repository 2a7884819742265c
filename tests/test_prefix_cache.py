"""vLLM's prefix cache reuses the chat-template prefix that requests of one adapter share.

Two requests with different speech and the same system prompt: the second finds the KV blocks of
the shared head (system prompt + user header, before the audio) in the cache, and nothing beyond
it (the audio differs; prompt embeddings are hashed per block). Asserted from vLLM's own counters
on the server's /metrics.
"""

from __future__ import annotations

import httpx

from test_metrics import scrape
from test_serving_api import audio_json

BLOCK = 32  # the server's KV block size on the CPU (server/engine/vllm_engine.py)
SYSTEM = ("You are a careful assistant inside a prefix cache test. Listen to the user's recording, "
          "answer the spoken question in one short sentence, and never add anything that was not "
          "asked. If the recording is unclear, say so plainly and ask the user to repeat it. Keep the "
          "tone friendly, use plain words, and answer in the language the user speaks.")


def counter(url: str, name: str) -> float:
    return sum(s.value for s in scrape(url).get(name, []) if s.name == f"{name}_total")


def ask(url: str, wav) -> dict:
    body = audio_json(wav, model="alpha", max_tokens=2)
    body["messages"].insert(0, {"role": "system", "content": SYSTEM})
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_second_request_reuses_the_shared_prompt_head(server, speech, tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny.llm))
    head = tok.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": "<audio>"}],
                                   tokenize=False).split("<audio>")[0]
    head_tokens = len(tok.encode(head, add_special_tokens=False))
    assert head_tokens >= 2 * BLOCK  # the test needs whole shared blocks

    hits0, queries0 = counter(server.url, "vllm:prefix_cache_hits"), counter(server.url, "vllm:prefix_cache_queries")
    first = ask(server.url, speech["capital"])
    hits1, queries1 = counter(server.url, "vllm:prefix_cache_hits"), counter(server.url, "vllm:prefix_cache_queries")
    second = ask(server.url, speech["water"])
    hits2, queries2 = counter(server.url, "vllm:prefix_cache_hits"), counter(server.url, "vllm:prefix_cache_queries")

    assert queries1 - queries0 == first["usage"]["prompt_tokens"]
    assert hits1 - hits0 == 0  # nothing before it had this system prompt
    hits = hits2 - hits1
    # Every whole block of the shared head, and nothing past it (the audio differs).
    assert hits == (head_tokens // BLOCK) * BLOCK
    assert queries2 - queries1 == second["usage"]["prompt_tokens"]
    print(f"prefix cache: {hits:.0f} of {queries2 - queries1:.0f} prompt tokens reused "
          f"({hits / (queries2 - queries1):.0%}); shared head {head_tokens} tokens")
