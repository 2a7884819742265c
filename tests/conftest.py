"""Session-wide fixtures: tiny models + adapters, real speech, and one real server per session.

The server is the real thing: ``aura serve`` in a subprocess on a loopback port, vLLM's CPU
engine on a tiny random Llama (fp32, so the reference engine can be compared token for token).
Starting vLLM costs ~25 s, so every test that needs a server shares this one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from adapter_helpers import edit_json
from audio_helpers import speak
from launch import ServerProc, start_server, stop_server  # noqa: F401 (re-exported for tests)
from tiny_models import make_tiny_llama, save_smollm2_tokenizer

QUESTIONS = {
    "capital": "What is the capital of France?",
    "spider": "How many legs does a spider have?",
    "sky": "What color is the sky on a clear day?",
    "water": "At what temperature does water boil?",
}


@dataclass
class Tiny:
    root: Path
    llm: Path
    adapters: dict[str, Path]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    from adapters.adapter import LORA_CONFIG, init_adapter

    root = tmp_path_factory.mktemp("tiny")
    tok = save_smollm2_tokenizer(root / "tokenizer")
    llm = make_tiny_llama(root / "llm", tok)
    adapters = {}
    # beta's audio layer has a transformer block after the stem that runs on pairs of stem frames (encoder_stride 2:
    # eight stem frames per token where alpha has four) and sees 3 of them ahead, and its LoRA a per-block rank (16 in
    # block 0, 8 in block 1: PEFT's rank_pattern), so every parity, batching and realtime test also covers those paths
    for i, (name, blocks, ranks) in enumerate((("alpha", 0, None), ("beta", 1, {0: 16})), start=1):
        adapters[name] = init_adapter(llm, root / name, rank=8, seed=i, lora_init_std=0.05, conv_channels=64,
                                      encoder_layers=blocks, encoder_heads=4, rank_layers=ranks,
                                      encoder_lookahead=3 if blocks else 0, encoder_stride=2 if blocks else 1)
    # block 0 at scale 48 / 16 = 3 where the rest is 16 / 8 = 2: an engine that read the rank but not alpha_pattern
    # (or neither) would give other tokens than PEFT's reference engine
    pattern = json.loads((adapters["beta"] / LORA_CONFIG).read_text())["alpha_pattern"]
    edit_json(adapters["beta"], LORA_CONFIG, alpha_pattern=dict.fromkeys(pattern, 48.0))
    return Tiny(root, llm, adapters)


@pytest.fixture(scope="session")
def speech(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("speech")
    return {k: speak(text, d / f"{k}.wav") for k, text in QUESTIONS.items()}


@pytest.fixture(scope="session")
def server(tiny: Tiny, tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("home")
    args = ["--model", str(tiny.llm), "--dtype", "float32", "--max-num-seqs", "32", "--max-model-len", "1024"]
    for name, path in tiny.adapters.items():
        args += ["--adapter", f"{name}={path}"]
    srv = start_server(args, home, home / "server.log")
    yield srv
    stop_server(srv)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def reference(tiny: Tiny, tmp_path_factory: pytest.TempPathFactory):
    """The same service in-process on the plain-PyTorch reference engine (the parity oracle)."""
    from server.config import Settings
    from server.state import build_state

    # home: a temp dir, so the adapter cache (server/sources.py) does not land in ~/.cache/aura.
    settings = Settings(engine="reference", model=tiny.llm, dtype="float32", max_model_len=1024,
                        home=tmp_path_factory.mktemp("ref-home"),
                        adapters={k: str(v) for k, v in tiny.adapters.items()})
    state = await build_state(settings)
    yield state
    state.frontend.close()
    await state.engine.shutdown()
