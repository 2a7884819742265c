"""bench/audio_use.py: the control moves audio only within a task and never leaves a row its own
clip, and the report's "audio nats per token" is the rotated-audio loss minus the own-audio loss,
per split and task, from the trainer's own evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from test_training import _config, world  # noqa: F401  (the tiny student/teacher/espeak-ng world, session-scoped)

from adapters.training.data import ManifestRow
from adapters.training.trainer import Trainer
from bench.audio_use import main, rotated, summarize


def test_rotation_swaps_audio_within_each_task_only() -> None:
    rows = [ManifestRow(audio=f"a{i}.wav", task="qa" if i % 3 == 0 else "transcribe", text=f"t{i}") for i in range(12)]
    out = rotated(rows, shift=2)
    assert [r.text for r in out] == [r.text for r in rows] and [r.task for r in out] == [r.task for r in rows]
    for task in ("qa", "transcribe"):
        own = sorted(r.audio for r in rows if r.task == task)
        assert sorted(r.audio for r in out if r.task == task) == own  # a permutation within the task
    assert all(a.audio != b.audio for a, b in zip(rows, out))
    assert rows[0].audio == "a0.wav"  # input untouched


def test_report_is_rotated_minus_own_per_split_and_task(world: dict[str, Path], tmp_path: Path,  # noqa: F811
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(world, "audio_use_src", steps=2)
    Trainer(cfg).run()
    recipe = tmp_path / "recipe.yaml"
    # the LoRA shape it was trained with, and a validation hold-back larger than the manifests' sentences, as the GPU
    # recipe's 200 is larger than the 90 held-out ones: every row is still measured
    recipe.write_text(f"lora_rank: {cfg.lora_rank}\nlora_alpha: {cfg.lora_alpha}\nval_sentences: 1000\n")
    rc = main(["--adapter", str(cfg.output), "--config", str(recipe), "--student", str(world["student"]),
               "--teacher", str(world["teacher"]), "--train-manifest", str(world["manifest"]),
               "--heldout-manifest", str(world["manifest"]), "--rows", "6", "--threads", "1"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    t = Trainer(_config(world, "audio_use_check", init_from=cfg.output, distill_loss="none"))
    t.student.eval()
    for split in ("heldout", "train"):
        assert set(report[split]) == {"all", "transcribe", "qa"}
        for task, r in report[split].items():
            assert r["audio_nats_per_token"] == pytest.approx(r["rotated"] - r["own"], abs=2e-4)
            assert r["se"] > 0 and r["rows"] >= 2
        assert report[split]["transcribe"]["own"] != report[split]["transcribe"]["rotated"]  # another clip changes the loss
    # the held-out "own" losses are the trainer's own, row by row
    with torch.no_grad():
        own = [float(t._losses([i], t.examples, {})["ce"]) for i in range(min(6, len(t.examples)))]
    tasks = [e.task for e in t.examples[: len(own)]]
    for task in ("transcribe", "qa"):
        mine = [x for x, k in zip(own, tasks) if k == task]
        assert report["heldout"][task]["own"] == pytest.approx(sum(mine) / len(mine), abs=2e-4)
    assert not list(world["manifest"].parent.glob(".*.jsonl"))  # its temporary manifests are gone


def test_summary_pairs_rows_and_gives_the_standard_error() -> None:
    own = [("qa", 1.0), ("transcribe", 4.0), ("qa", 2.0), ("transcribe", 5.0)]
    rot = [("qa", 1.5), ("transcribe", 4.0), ("qa", 2.5), ("transcribe", 6.0)]
    s = summarize(own, rot)
    assert s["qa"]["audio_nats_per_token"] == 0.5 and s["qa"]["se"] == 0.0  # paired: the same gain on both rows
    assert s["transcribe"]["audio_nats_per_token"] == 0.5 and s["transcribe"]["se"] == pytest.approx(0.5)
    assert s["all"]["rows"] == 4 and s["all"]["own"] == 3.0
