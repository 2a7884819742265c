"""The character bottleneck: a run's character head spells held-out clips (``Trainer.char_logits``,
the very logits its evaluation scores), ``bench.char_readout`` turns the spelling into the LLM's own
character-token vectors, and a reader trained on text alone (``bench.text_readout --train-arm
chars``, through ``spell``'s edits) transcribes them."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from test_training import _config, world  # noqa: F401  (the tiny student/teacher/espeak-ng world, session-scoped)

from adapters.training.ctc import CHAR_SLOTS, CHAR_UNITS, CHARS, Units, decode_chars, greedy_ctc, normalize_chars
from adapters.training.evaluate import cer
from adapters.training.trainer import ConfigError, Trainer
from bench.char_readout import char_vectors
from bench.char_readout import main as char_main
from bench.text_readout import lay_out, spell, unit_slots
from bench.text_readout import main as text_main


def test_char_vectors_mix_the_character_tokens_and_blanks_write_nothing() -> None:
    table = torch.randn(len(CHARS), 6)
    logits = torch.full((3, len(CHARS) + 1), -30.0)
    logits[0, 0] = 30.0  # a sure blank
    logits[1, 1 + CHARS.index("a")] = 30.0  # a sure "a"
    logits[2, 1 + CHARS.index("b")] = 0.0  # torn: "b" or blank, half each
    logits[2, 0] = 0.0
    hard = char_vectors(logits, table, "hard")
    assert torch.equal(hard[0], torch.zeros(6)) and torch.equal(hard[1], table[CHARS.index("a")])
    soft = char_vectors(logits, table, "soft")
    torch.testing.assert_close(soft[0], torch.zeros(6), rtol=0, atol=1e-6)
    torch.testing.assert_close(soft[1], table[CHARS.index("a")], rtol=0, atol=1e-5)
    torch.testing.assert_close(soft[2], 0.5 * table[CHARS.index("b")], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="unknown mode"):
        char_vectors(logits, table, "argmax")


def test_collapsed_vectors_are_the_best_path_laid_out_as_a_reader_was_trained() -> None:
    table = torch.randn(len(CHARS), 5)
    path = "aa_b__bc_"  # best path over 9 head positions: a a blank b blank blank b c blank -> "abbc"
    logits = torch.full((len(path), len(CHARS) + 1), -30.0)
    for i, c in enumerate(path):
        logits[i, 0 if c == "_" else 1 + CHARS.index(c)] = 30.0
    want = [table[CHARS.index(c)] for c in "abbc"]
    for slots in (9, 4, 6):  # a spelling reader (every head slot), a pieces reader (fewer), uneven spreads
        out = char_vectors(logits, table, "collapsed", slots)
        assert out.shape == (slots, 5)
        written = [v for v in out if v.abs().sum() > 0]
        assert len(written) == 4 and all(torch.equal(w, t) for w, t in zip(written, want))
        assert torch.equal(out, lay_out(torch.stack(want), slots, "blanks"))
    spread = char_vectors(logits, table, "collapsed", 9)  # spread (slots 0, 2, 4, 6), not packed at the front
    assert [i for i, v in enumerate(spread) if v.abs().sum() > 0] == [0, 2, 4, 6]
    silent = torch.full((6, len(CHARS) + 1), -30.0)
    silent[:, 0] = 30.0  # a head that heard nothing: all blank
    assert torch.equal(char_vectors(silent, table, "collapsed", 3), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="slot count"):
        char_vectors(logits, table, "collapsed")
    assert unit_slots(CHAR_UNITS, 9) == 9 * CHAR_SLOTS
    assert unit_slots(Units("pieces8", 300, list, str, token_ids=(1,) * 300), 9) == 9


def _other_sentences(manifest: Path, out: Path) -> Path:
    """The manifest's clips under sentences none of its own rows has: a reader's training text, which
    ``char_readout`` refuses to share with the held-out clips it reads."""
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    out.write_text("".join(json.dumps({**r, "audio": str((manifest.parent / r["audio"]).resolve()),
                                       "text": f"{r['text']} said the voice"}) + "\n" for r in rows))
    return out


def test_spell_edits_about_the_share_it_is_asked_for() -> None:
    texts = ["The quick brown fox jumps over the lazy dog.", "What is the capital of France?",
             "I'd like to book a table for two at seven tonight."] * 20
    assert [spell(t, 0.0, random.Random(0)) for t in texts] == [normalize_chars(t) for t in texts]
    for rate in (0.1, 0.3):
        spelled = [spell(t, rate, random.Random(i)) for i, t in enumerate(texts)]
        assert all(set(s) <= set(CHARS) for s in spelled)
        measured = cer([normalize_chars(t) for t in texts], spelled)
        assert abs(measured - rate) < 0.35 * rate, (rate, measured)


def test_char_logits_are_what_the_evaluation_scores(world: dict[str, Path]) -> None:  # noqa: F811
    t = Trainer(_config(world, "char_logits", char_ctc_weight=1.0, char_ctc_layer=1, eval_manifest=world["manifest"],
                        eval_examples=4))
    for step in range(2):
        t.train_step(step)
    logits = t.char_logits(t.eval_examples)
    assert t.student.training  # left as it was found
    assert [x.shape for x in logits] == [(e.num_audio_tokens * 2, len(CHARS) + 1) for e in t.eval_examples]
    hyps = [decode_chars(h) for h in greedy_ctc(torch.nn.utils.rnn.pad_sequence(logits, batch_first=True),
                                                torch.tensor([x.shape[0] for x in logits]), blank=0)]
    refs = [decode_chars(e.transcript_chars) for e in t.eval_examples]
    assert cer(refs, hyps) == pytest.approx(t.evaluate()["eval_char_cer"], abs=1e-9)
    with pytest.raises(ConfigError, match="no character head"):
        Trainer(_config(world, "no_char_head")).char_logits(t.eval_examples)


def test_cli_spells_held_out_clips_and_a_text_trained_reader_transcribes_them(  # noqa: F811
        world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bench.oracle_readout import main as oracle_main

    cfg = _config(world, "char_cli")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("lora_rank: 4\nlora_alpha: 8\nlr: 3.0e-3\nwarmup_steps: 0\nlog_every: 1\nsave_every: 0\n"
                      "eval_every: 0\nchar_ctc_weight: 1.0\nchar_ctc_layer: 1\nprogress: false\nseed: 3\n")
    run = ["--config", str(recipe), "--student", str(cfg.student), "--teacher", str(cfg.teacher),
           "--manifest", str(cfg.manifest), "--eval-manifest", str(cfg.manifest), "--batch-size", "2",
           "--teacher-cache", str(cfg.teacher_cache), "--work-dir", str(tmp_path / "work"), "--threads", "1", "--steps", "2"]
    assert oracle_main(run) == 0
    capsys.readouterr()

    # a reader of spellings, trained on text alone; it reads the held-out spellings clean and edited
    reader, results = tmp_path / "reader", tmp_path / "text.json"
    texts = _other_sentences(cfg.manifest, tmp_path / "reader_text.jsonl")
    assert text_main(["--student", str(cfg.student), "--manifest", str(cfg.manifest), "--train-manifest", str(texts),
                      "--limit", "1", "--arms", "chars", "pieces", "--char-noise", "0", "0.3", "--train-arm", "chars",
                      "--train-char-noise", "0.2", "--train-steps", "10", "--eval-every", "10", "--batch-size", "2",
                      "--lr", "1e-2", "--max-tokens", "4", "--threads", "1", "--json", str(results),
                      "--save-reader", str(reader)]) == 0
    out = capsys.readouterr()
    columns = [r["arm"] for r in json.loads(results.read_text()) if r["model"].startswith("text-trained")]
    assert columns[0] == "chars" and columns[1].startswith("chars (CER ") and columns[2] == "pieces"
    assert columns[3].startswith("pieces (CER ") and len(columns) == 4  # pieces are misspelled before the cut too
    losses = [json.loads(line)["loss"] for line in out.err.splitlines() if line.startswith('{"step"')]
    assert losses[-1] < losses[0]  # the reader learns to write the transcript from its spelling

    # the run's checkpoint spells the held-out clips; the reader transcribes them
    final = tmp_path / "char.json"
    assert char_main(["--reader", str(reader), "--oracle", "--limit", "3", "--max-tokens", "4", "--json", str(final), *run]) == 0
    printed = capsys.readouterr()
    got = json.loads(final.read_text())
    assert got["step"] == 2 and got["clips"] == 3 and 0.0 <= got["char_cer"]
    assert got["checkpoint"].endswith("ckpt-0000002.pt")
    assert all(got[m]["wer"] >= 0 for m in ("soft", "hard", "collapsed"))
    assert got["soft"]["examples"][0]["ref"] and "| ckpt-0000002.pt | 2 |" in printed.out
    rows = got["hard"]["rows"]  # every clip, and how many reads ran to --max-tokens without ending
    assert len(rows) == 3 and rows[0] == got["hard"]["examples"][0] and 0 <= got["hard"]["unended"] <= 3
    # other settings than the checkpoint's: refused with the reason, not read with the wrong model
    assert char_main(["--reader", str(reader), "--oracle", *run, "--char-ctc-layer", "0"]) == 2
    assert "different settings" in capsys.readouterr().err


def test_piece_units_are_the_llms_tokens_and_spell_back_the_normalised_transcript(world: dict[str, Path]) -> None:  # noqa: F811
    from transformers import AutoTokenizer

    from adapters.training.ctc import piece_units

    tok = AutoTokenizer.from_pretrained(str(world["student"]))
    units = piece_units(world["student"], 128)
    assert units.name == "pieces128" and units.token_ids is not None and len(units.token_ids) == units.size
    assert 128 < units.size <= 128 + 256 + 1  # one class per merge kept, plus the byte alphabet
    for text in ["How do I navigate through a pegboard?", "It's 5 o'clock, Mr. Smith!"]:
        classes = units.encode(text)
        assert classes and all(1 <= k <= units.size for k in classes)  # 0 stays the blank
        assert units.decode(classes) == normalize_chars(text)
        # the classes are the LLM's own tokens: its tokenizer reads them as the normalised text
        assert tok.decode([units.token_ids[k - 1] for k in classes]) == normalize_chars(text)
        assert len(classes) > len(tok.encode(normalize_chars(text), add_special_tokens=False))  # a finer cut


def test_a_run_can_spell_in_pieces(world: dict[str, Path]) -> None:  # noqa: F811
    t = Trainer(_config(world, "pieces_run", char_ctc_weight=1.0, char_ctc_layer=1, char_ctc_merges=128,
                        eval_manifest=world["manifest"], eval_examples=4, lr=1e-2))
    assert t.units.name == "pieces128" and t.student.char_head is not None and t.student.char_head.classes == t.units.size + 1
    assert [e.transcript_chars for e in t.examples[:2]] == [t.units.encode(e.text) for e in t.setup.rows[:2]]
    first = t.evaluate()
    assert first is not None and 0.0 <= first["eval_char_cer"]
    losses = [t.train_step(s)["char_ctc"] for s in range(12)]
    assert all(torch.isfinite(torch.tensor(losses))) and sum(losses[-3:]) < 0.8 * sum(losses[:3]), losses
    logits = t.char_logits(t.eval_examples)
    assert logits[0].shape[1] == t.units.size + 1
    with pytest.raises(ConfigError, match="needs char_ctc_weight"):
        Trainer(_config(world, "pieces_no_head", char_ctc_merges=128))


def test_cli_reads_a_pieces_run_with_a_pieces_reader(world: dict[str, Path], tmp_path: Path,  # noqa: F811
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from bench.oracle_readout import main as oracle_main

    cfg = _config(world, "pieces_cli")
    run = ["--student", str(cfg.student), "--teacher", str(cfg.teacher), "--manifest", str(cfg.manifest),
           "--eval-manifest", str(cfg.manifest), "--batch-size", "2", "--lora-rank", "4", "--lora-alpha", "8",
           "--char-ctc-weight", "1.0", "--char-ctc-layer", "1", "--char-ctc-merges", "64", "--save-every", "0",
           "--eval-every", "0", "--no-progress", "--teacher-cache", str(cfg.teacher_cache),
           "--work-dir", str(tmp_path / "work"), "--threads", "1", "--steps", "2"]
    assert oracle_main(run) == 0
    reader = tmp_path / "reader"
    texts = _other_sentences(cfg.manifest, tmp_path / "reader_text.jsonl")
    assert text_main(["--student", str(cfg.student), "--manifest", str(cfg.manifest), "--train-manifest", str(texts),
                      "--limit", "1", "--arms", "pieces", "--merges", "64", "--train-arm", "pieces", "--train-steps", "2",
                      "--train-char-noise", "0.3",
                      "--eval-every", "2", "--batch-size", "2", "--max-tokens", "4", "--threads", "1",
                      "--save-reader", str(reader)]) == 0
    capsys.readouterr()
    final = tmp_path / "pieces.json"
    assert char_main(["--reader", str(reader), "--oracle", "--limit", "2", "--max-tokens", "4", "--modes", "hard",
                      "collapsed", "--json", str(final), *run]) == 0
    got = json.loads(final.read_text())
    assert got["units"] == "pieces64" and got["clips"] == 2 and {"hard", "collapsed"} <= set(got) and "soft" not in got
    # a reader whose training manifest holds the sentences it would be scored on is refused, before any reading
    cfg_file = reader / "aura_config.json"
    saved = json.loads(cfg_file.read_text())
    assert saved["training"]["text_reader"]["manifest_path"] == str(texts.resolve())
    saved["training"]["text_reader"]["manifest_path"] = str(cfg.manifest.resolve())
    cfg_file.write_text(json.dumps(saved))
    capsys.readouterr()
    assert char_main(["--reader", str(reader), "--oracle", "--limit", "2", *run]) == 2
    err = capsys.readouterr().err
    assert "trained on 1 of these 2 held-out sentences (e.g. 'The little dog ran home.')" in err  # the QA row's is not a reader's text
