"""bench/audio_use.py: the control moves audio only within a task and never leaves a row its own
clip, and the report's "audio nats per token" is the rotated-audio loss minus the own-audio loss,
per split and task, from the trainer's own evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_training import _config, world  # noqa: F401  (the tiny student/teacher/espeak-ng world, session-scoped)

from adapters.training.trainer import Trainer
from bench.audio_use import main, rotated


def test_rotation_swaps_audio_within_each_task_only() -> None:
    rows = [{"audio": f"a{i}.wav", "task": "qa" if i % 3 == 0 else "transcribe", "text": f"t{i}"} for i in range(12)]
    out = rotated(rows, shift=2)
    assert [r["text"] for r in out] == [r["text"] for r in rows] and [r["task"] for r in out] == [r["task"] for r in rows]
    for task in ("qa", "transcribe"):
        own = sorted(r["audio"] for r in rows if r["task"] == task)
        assert sorted(r["audio"] for r in out if r["task"] == task) == own  # a permutation within the task
    assert all(a["audio"] != b["audio"] for a, b in zip(rows, out))
    assert rows[0]["audio"] == "a0.wav"  # input untouched


def test_report_is_rotated_minus_own_per_split_and_task(world: dict[str, Path], tmp_path: Path,  # noqa: F811
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(world, "audio_use_src", steps=2)
    Trainer(cfg).run()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"lora_rank: {cfg.lora_rank}\nlora_alpha: {cfg.lora_alpha}\n")  # the LoRA shape it was trained with
    rc = main(["--adapter", str(cfg.output), "--config", str(recipe), "--student", str(world["student"]),
               "--teacher", str(world["teacher"]), "--train-manifest", str(world["manifest"]),
               "--heldout-manifest", str(world["manifest"]), "--rows", "6", "--threads", "1", "--batch-size", "2"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for split in ("heldout", "train"):
        own, rot, gain = report[split]["own"], report[split]["rotated"], report[split]["audio_nats_per_token"]
        assert {"ce", "ce_transcribe", "ce_qa"} <= set(own)
        for k in own:
            assert gain[k] == pytest.approx(rot[k] - own[k], abs=2e-4)
        assert own["ce_transcribe"] != rot["ce_transcribe"]  # another clip changes the loss: the audio is read
    assert not list(world["manifest"].parent.glob(".*.jsonl"))  # its temporary manifests are gone
