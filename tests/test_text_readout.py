"""bench/text_readout.py: the transcript's token embeddings laid over the audio positions the way a
CTC path lays its labels (stretched, or spread between blank zero vectors), and a LoRA trained on
text alone to read them; its CLI reads held-out rows it never trains on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from test_training import world  # noqa: F401  (the tiny student/teacher/espeak-ng world, session-scoped)

from bench.text_readout import lay_out, main


def test_arms_lay_every_token_out_in_order() -> None:
    tokens = torch.arange(1, 3 * 4 + 1, dtype=torch.float32).reshape(3, 4)
    assert torch.equal(lay_out(tokens, 8, "text"), tokens)
    stretched = lay_out(tokens, 8, "stretched")
    assert stretched.shape == (8, 4)
    order = [int(row[0] - 1) // 4 for row in stretched]  # which token each position holds
    assert order == sorted(order) and set(order) == {0, 1, 2} and order[0] == 0 and order[-1] == 2
    blanks = lay_out(tokens, 8, "blanks")
    nonzero = [i for i in range(8) if blanks[i].abs().sum() > 0]
    assert len(nonzero) == 3 and nonzero[0] == 0 and max(b - a for a, b in zip(nonzero, nonzero[1:])) <= 3
    assert torch.equal(blanks[nonzero], tokens)  # the tokens themselves, in order; zeros between
    assert torch.equal(lay_out(tokens, 2, "blanks"), tokens)  # fewer positions than tokens: nothing to spread
    with pytest.raises(ValueError, match="unknown arm"):
        lay_out(tokens, 8, "ctc")


def test_cli_reads_held_out_rows_and_trains_a_reader_on_the_others(world: dict[str, Path], tmp_path: Path,  # noqa: F811
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--student", str(world["student"]), "--manifest", str(world["manifest"]), "--train-manifest",
              str(world["manifest"]), "--arms", "blanks", "stretched", "--threads", "1", "--max-tokens", "6"]
    # every transcription row is held out: nothing is left to train on, and it says so
    assert main([*common, "--limit", "2"]) == 2
    assert "not read as held-out" in capsys.readouterr().err

    out = tmp_path / "results.json"
    reader = tmp_path / "reader"
    assert main([*common, "--limit", "1", "--train-steps", "30", "--eval-every", "30", "--lr", "1e-2",
                 "--batch-size", "2", "--json", str(out), "--save-reader", str(reader)]) == 0
    captured = capsys.readouterr()
    log = [json.loads(line) for line in captured.err.splitlines() if line.startswith('{"step"')]
    assert [r["step"] for r in log] == [1, 10, 20, 30]
    assert log[-1]["loss"] < 0.5 * log[0]["loss"]  # the LoRA learns to write the laid-out transcript
    results = json.loads(out.read_text())
    readers = [(r["model"], r["arm"]) for r in results]
    assert readers == [("base LLM (no LoRA)", "blanks"), ("base LLM (no LoRA)", "stretched"),
                       ("text-trained LoRA (blanks), step 30", "blanks"), ("text-trained LoRA (blanks), step 30", "stretched")]
    assert all(r["rows"] == 1 and r["wer"] >= 0 for r in results)
    assert results[0]["examples"][0]["ref"] == "The little dog ran home."  # the held-out row, never trained on
    assert "| text-trained LoRA (blanks), step 30 |" in captured.out
    # the reader is an adapter a training run can start from, holding the trained LoRA
    from safetensors.torch import load_file

    from adapters.adapter import load_adapter
    from adapters.base_model import read_base_model
    from adapters.validate import validate_adapter

    config = validate_adapter(reader, base=read_base_model(world["student"]), max_lora_rank=16)
    assert config.training["text_reader"]["steps"] == 30 and load_adapter(reader).lora_rank == 16
    lora = load_file(str(reader / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in lora.items())  # trained: B left PEFT's zero start


def test_pieces_are_the_llms_own_tokens_cut_finer(world: dict[str, Path]) -> None:  # noqa: F811
    from transformers import AutoTokenizer

    from adapters.training.ctc import normalize_chars, piece_units

    tok = AutoTokenizer.from_pretrained(str(world["student"]))
    texts = [normalize_chars(t) for t in
             ["How do I navigate through a pegboard?", "The weather is nice today.", "Call Dr. O'Brien at 7:45 tomorrow!"]]
    counts = {}
    for merges in (0, 256, 1024, 10**6):
        units = piece_units(world["student"], merges)
        ids = [[units.token_ids[k - 1] for k in units.encode(t)] for t in texts]
        assert [tok.decode(i) for i in ids] == texts  # the LLM's tokenizer reads the pieces back to the same text
        assert all(0 <= i < len(tok) for seq in ids for i in seq)
        counts[merges] = sum(map(len, ids))
    assert counts[10**6] == sum(len(tok.encode(t, add_special_tokens=False)) for t in texts)  # all merges: the LLM's own cut
    assert counts[0] == sum(len(t) for t in texts)  # no merges: one piece per character
    assert counts[0] > counts[256] > counts[1024] > counts[10**6]
