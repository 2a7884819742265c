"""LoRA loads stay off vLLM's step loop: hot loads are prepared ahead, and many tenants never miss.

``POST /v1/adapters`` has the engine's workers read, validate and pack the LoRA in a thread
(server/engine/lora_prepare.py) before ``add_lora``, so the step loop only registers the ready
model. Asserted from the workers' own counters on /metrics (``aura_engine_lora_loads``): the load
is counted ``off_loop``, none ``in_loop``; and the adapter answers token for token like the same
weights loaded under another name, on both versions of a replace.

With more adapters than the engine's LoRA slots used round-robin, the host cache must hold them
all (its default covers every configured adapter): with an LRU smaller than the round, every
request would re-read its adapter inside the step loop.
"""

from __future__ import annotations

import httpx
import pytest

from conftest import Tiny, start_server, stop_server
from test_metrics import scrape, value
from test_serving_api import audio_json

MANY = 18  # more than the old fixed host cache (16) and than the slots (max_loras 4)


def loads(url: str) -> tuple[float, float]:
    families = scrape(url)
    return (value(families, "aura_engine_lora_loads", where="off_loop"),
            value(families, "aura_engine_lora_loads", where="in_loop"))


def tokens(url: str, wav, model: str) -> list[int]:
    r = httpx.post(f"{url}/v1/chat/completions", json=audio_json(wav, model=model, max_tokens=12,
                                                                    return_token_ids=True), timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def load(url: str, name: str, source: str) -> dict:
    r = httpx.post(f"{url}/v1/adapters", json={"name": name, "source": source}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_hot_loads_are_prepared_off_the_step_loop_and_answer_like_the_same_weights(server, tiny, speech):
    clip = speech["spider"]
    off0, in0 = loads(server.url)
    v1 = load(server.url, "prepared", str(tiny.adapters["beta"]))
    as_beta = tokens(server.url, clip, "prepared")
    off1, in1 = loads(server.url)
    assert (off1 - off0, in1 - in0) == (1, 0)

    v2 = load(server.url, "prepared", str(tiny.adapters["alpha"]))  # a replace: a new LoRA id, prepared again
    assert v2["lora_id"] != v1["lora_id"]
    as_alpha = tokens(server.url, clip, "prepared")
    off2, in2 = loads(server.url)
    assert (off2 - off1, in2 - in1) == (1, 0)

    assert as_beta != as_alpha, "the two adapters must answer differently for this test to mean anything"
    assert as_beta == tokens(server.url, clip, "beta")
    assert as_alpha == tokens(server.url, clip, "alpha")
    assert httpx.delete(f"{server.url}/v1/adapters/prepared", timeout=60).status_code == 200


@pytest.fixture(scope="module")
def many(tiny: Tiny, tmp_path_factory: pytest.TempPathFactory):
    from adapters.adapter import init_adapter

    root = tmp_path_factory.mktemp("many")
    args = ["--model", str(tiny.llm), "--dtype", "float32", "--max-num-seqs", "8", "--max-model-len", "1024"]
    for i in range(MANY):
        path = init_adapter(tiny.llm, root / f"t{i:02d}", rank=8, seed=100 + i, lora_init_std=0.05, conv_channels=16)
        args += ["--adapter", f"t{i:02d}={path}"]
    srv = start_server(args, root / "home", root / "server.log")
    yield srv
    stop_server(srv)


def test_a_round_robin_over_more_adapters_than_slots_never_reads_in_the_step_loop(many, speech):
    names = [f"t{i:02d}" for i in range(MANY)]
    resident = httpx.get(f"{many.url}/v1/adapters", timeout=30).json()["engine_lora_ids"]
    assert len(resident) == MANY  # every configured adapter is in the engine's host cache
    off0, in0 = loads(many.url)
    for _ in range(2):
        for name in names:
            r = httpx.post(f"{many.url}/v1/chat/completions",
                           json=audio_json(speech["sky"], model=name, max_tokens=1), timeout=120)
            assert r.status_code == 200, r.text
    off1, in1 = loads(many.url)
    assert (off1 - off0, in1 - in0) == (0, 0)  # slots changed hands 36 times, the disk was never read
