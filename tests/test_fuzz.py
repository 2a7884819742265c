"""A bounded fuzz loop of random, truncated and bit-flipped uploads against the real server.

Each case must get a 200 or a clear 4xx (never a 5xx, never a hang), and after every case the
server must still answer a good request with exactly the tokens it gave before.
"""

from __future__ import annotations

import io
import random
import time

import httpx
import numpy as np
import soundfile as sf

CASES = 48
BUDGET_S = 120.0  # the loop stops early rather than run long on a slow machine
GOOD = {"adapter": "beta", "max_tokens": "5", "return_token_ids": "true"}


def _encoded(wav: bytes, fmt: str) -> bytes:
    samples, sr = sf.read(io.BytesIO(wav), dtype="float32")
    buf = io.BytesIO()
    sf.write(buf, samples, sr, format=fmt)
    return buf.getvalue()


def _sources(wav: bytes) -> dict[str, bytes]:
    return {"wav": wav, "flac": _encoded(wav, "FLAC"), "ogg": _encoded(wav, "OGG")}


def _mutants(sources: dict[str, bytes], seed: int = 1234):
    """The same sources and seed give the same cases (Ogg itself picks a random stream serial)."""
    rng = random.Random(seed)
    kinds = ["random", "truncated", "bitflip", "header_swap", "repeat"]
    for i in range(CASES):
        kind = kinds[i % len(kinds)]
        name, src = rng.choice(sorted(sources.items()))
        if kind == "random":
            yield f"random-{i}", rng.randbytes(rng.choice([0, 1, 7, 44, 512, 4096, 65536]))
        elif kind == "truncated":
            yield f"truncated-{name}-{i}", src[: rng.randrange(0, len(src))]
        elif kind == "bitflip":
            data = bytearray(src)
            for _ in range(rng.choice([1, 8, 64])):
                pos = rng.randrange(min(len(data), 256) if rng.random() < 0.5 else len(data))
                data[pos] ^= 1 << rng.randrange(8)
            yield f"bitflip-{name}-{i}", bytes(data)
        elif kind == "header_swap":  # one container's header on another's payload
            other = rng.choice([s for n, s in sources.items() if n != name])
            cut = rng.randrange(4, 64)
            yield f"header-swap-{name}-{i}", other[:cut] + src[cut:]
        else:
            yield f"repeat-{name}-{i}", src[: rng.randrange(1, 200)] * rng.randrange(2, 50)


def _good(url: str, wav: bytes) -> list[int]:
    r = httpx.post(f"{url}/v1/audio/chat", files={"file": ("q.wav", wav)}, data=GOOD, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def test_fuzzed_uploads_never_break_the_server(server, speech):
    wav = speech["water"].read_bytes()
    expected = _good(server.url, wav)
    seen: dict[int, int] = {}
    t0 = time.monotonic()
    done = 0
    for name, data in _mutants(_sources(wav)):
        if time.monotonic() - t0 > BUDGET_S:
            break
        r = httpx.post(f"{server.url}/v1/audio/chat", files={"file": ("clip", data)},
                       data={**GOOD, "max_tokens": "3"}, timeout=60)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code in (200, 400, 413, 415), f"{name}: {r.status_code} {r.text}"
        if r.status_code != 200:
            err = r.json()["error"]
            assert err["code"].startswith("audio_") and len(err["message"]) > 10, (name, err)
        assert _good(server.url, wav) == expected, f"after {name} a good request changed"
        done += 1
    assert done >= min(CASES, 10), f"only {done} cases ran within {BUDGET_S} s"
    assert len(seen) >= 2, seen  # the loop exercised both acceptance and refusal


def test_mutants_are_deterministic(speech):
    sources = _sources(speech["water"].read_bytes())
    a = [d for _, d in _mutants(sources)]
    b = [d for _, d in _mutants(sources)]
    assert a == b and len(a) == CASES and np.mean([len(x) for x in a]) > 0


# ---- the HTTP-surface fuzzer (bench/fuzz.py), a fast seeded subset ----------------------------------

FUZZ_CASES_PER_FAMILY = 10
# Findings the fuzzer reproduces whose fixes live on the request-path branch (issue 9, item 9:
# JSON nested 100,000 deep, lone surrogates, seed >= 2**64, an empty stop string, a WAV with a
# few ms of samples -> 500 or a dropped stream). Case names matching these are reported, not
# failed, until that branch is merged; then empty this tuple.
def test_seeded_fuzzer_over_every_family_keeps_the_server_whole(server, speech, tiny, tmp_path):
    """Multipart, JSON, headers, audio containers and adapter archives: every case a 2xx or a
    JSON 4xx, and after each one the same tokens for a good request and fast /health, /metrics."""
    from bench.fuzz import FAMILIES, make_seeds, print_table, run

    seeds = make_seeds(speech["capital"].read_bytes(), tiny.adapters["alpha"], tmp_path)
    result = run(server.url, seeds, FUZZ_CASES_PER_FAMILY * len(FAMILIES), seed=7, budget_s=240)
    print_table(result)
    assert result["cases"] >= 2 * len(FAMILIES), result
    assert set(result["families"]) == set(FAMILIES)
    violations = [v for f in result["families"].values() for v in f["violations"]]
    assert not violations, violations


def test_fuzz_cases_are_deterministic(speech, tiny, tmp_path):
    from bench.fuzz import cases, make_seeds

    seeds = make_seeds(speech["capital"].read_bytes(), tiny.adapters["alpha"], tmp_path)
    a = [(c.family, c.name, c.body, c.raw) for c in cases(seeds, 60, seed=3)]
    b = [(c.family, c.name, c.body, c.raw) for c in cases(seeds, 60, seed=3)]
    assert a == b and len({c[0] for c in a}) == 6
