"""``aura eval``: the text metrics on known strings, and the output shape on a tiny run (through the
served pipeline, ``ChatService.run`` on the reference engine)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from adapters.training.evaluate import edit_distance, exact_match, normalize_text, token_f1, wer
from server.evaluation import EvalOptions, run_eval


def test_normalize_text() -> None:
    assert normalize_text("  Hello, World!  ") == "hello world"
    assert normalize_text("It's 2 o'clock.") == "its two oclock"
    assert normalize_text("Café—au-lait") == "cafe au lait"


def test_wer_on_known_strings() -> None:
    assert wer(["the cat sat on the mat"], ["the cat sat on the mat"]) == 0.0
    assert wer(["the cat sat on the mat"], ["the cat sat on mat"]) == pytest.approx(1 / 6)  # one deletion
    assert wer(["the cat sat"], ["the bat sat down"]) == pytest.approx(2 / 3)  # substitution + insertion
    assert wer(["The cat, sat."], ["the CAT sat"]) == 0.0  # normalised first
    # corpus WER pools the edits: 1 edit over 3 + 2 words
    assert wer(["a b c", "d e"], ["a b c", "d"]) == pytest.approx(1 / 5)
    assert edit_distance(["a", "b"], []) == 2


def test_answer_agreement_metrics() -> None:
    assert exact_match("The capital of France is Paris.", "the capital of france is paris") == 1.0
    assert exact_match("Paris", "London") == 0.0
    assert token_f1("the capital is paris", "paris is the capital") == 1.0
    assert token_f1("the capital is paris", "paris") == pytest.approx(2 * 1.0 * 0.25 / 1.25)
    assert token_f1("paris", "london") == 0.0


class _Records(logging.Handler):
    """The warnings a logger emitted."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_eval_output_shape(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """AuRA + cascade on two clips; the last stdout line is one JSON object with every figure, and --quiet
    means quiet: no per-clip warnings from transformers' Whisper generate on stderr."""
    from audio_helpers import speak
    from tiny_models import make_tiny_llama, save_smollm2_tokenizer

    from adapters.adapter import init_adapter
    from adapters.provision.demo import DEMO_TEACHER_NAME, demo_models_dir
    from server.cli import main

    tok = save_smollm2_tokenizer(tmp_path / "tok")
    llm = make_tiny_llama(tmp_path / "llm", tok)
    adapter = init_adapter(llm, tmp_path / "adapter", rank=4, conv_channels=64, lora_init_std=0.02)
    (tmp_path / "audio").mkdir()
    rows = [("transcribe", "A blue car stopped."), ("qa", "What color is grass?")]
    for i, (task, text) in enumerate(rows):
        speak(text, tmp_path / "audio" / f"c{i}.wav", speed=220)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"audio": f"audio/c{i}.wav", "task": t, "text": x}) + "\n"
                                for i, (t, x) in enumerate(rows)))
    teacher = demo_models_dir() / DEMO_TEACHER_NAME
    argv = ["eval", "--manifest", str(manifest), "--adapter", str(adapter), "--model", str(llm),
            "--max-tokens", "4", "--quiet", "--details", str(tmp_path / "details.jsonl")]
    argv += ["--teacher", str(teacher)] if (teacher / "config.json").is_file() else ["--no-cascade"]
    monkeypatch.setenv("AURA_HOME", str(tmp_path / "home"))  # the server's adapter cache
    seen = _Records()
    hf_root = logging.getLogger("transformers")  # its own handler, propagate=False: watch it directly
    hf_root.addHandler(seen)
    try:
        assert main(argv) == 0
    finally:
        hf_root.removeHandler(seen)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert not [r.getMessage() for r in seen.records if "max_new_tokens" in r.getMessage()]
    assert summary["clips"] == 2 and summary["n_transcribe"] == 1 and summary["n_qa"] == 1
    systems = ["aura"] + (["cascade"] if "--teacher" in argv else [])
    for system in systems:
        block = summary[system]
        assert 0.0 <= block["qa_em"] <= 1.0 and 0.0 <= block["qa_f1"] <= 1.0 and block["wer"] >= 0.0
        for key in ("ttft", "total"):
            assert set(block[key]) == {"mean_ms", "p50_ms", "p90_ms"}
            assert block[key]["mean_ms"] > 0
        assert block["ttft"]["mean_ms"] <= block["total"]["mean_ms"]
    details = [json.loads(line) for line in (tmp_path / "details.jsonl").read_text().splitlines()]
    assert details[1]["reference"] is not None and "aura_f1" in details[1]
    assert summary["adapter"] == "eval" and summary["adapter_source"] == str(adapter)
    assert "ChatService.run" in summary["engine"]


def test_eval_without_adapter_evaluates_the_default_adapter(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """No --adapter: the adapter the server would serve by default is evaluated (the demo adapter
    when it fits the model; on this tiny model, the freshly initialised default), not nothing."""
    from audio_helpers import speak
    from tiny_models import make_tiny_llama, save_smollm2_tokenizer

    from server.cli import main

    llm = make_tiny_llama(tmp_path / "llm", save_smollm2_tokenizer(tmp_path / "tok"))
    speak("A red bus.", tmp_path / "c0.wav", speed=220)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"audio": "c0.wav", "task": "transcribe", "text": "A red bus."}) + "\n")
    monkeypatch.setenv("AURA_HOME", str(tmp_path / "home"))
    assert main(["eval", "--manifest", str(manifest), "--model", str(llm), "--no-cascade", "--max-tokens", "3",
                 "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["adapter"] in ("aura-demo", "default") and summary["aura"]["wer"] >= 0.0
    assert summary["aura"]["ttft"]["mean_ms"] > 0


def test_eval_options_defaults() -> None:
    opts = EvalOptions(manifest=Path("m.jsonl"), model=Path("llm"))
    assert opts.reference == "engine" and opts.adapter is None and run_eval is not None
