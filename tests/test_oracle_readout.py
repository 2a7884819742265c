"""bench/oracle_readout.py: the teacher in the audio layer's place. Its vectors are the teacher's own
pooled states of each clip alone (batch-mates and padding change nothing), at the audio layer's
token count; training moves the read-out and the LoRA and never the teacher; the CLI trains,
evaluates and resumes like a run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from test_training import _config, world  # noqa: F401  (the tiny student/teacher/espeak-ng world, session-scoped)

from adapters.training.data import collate
from adapters.training.teacher import encoder_states, pool_frames
from adapters.training.trainer import Trainer
from bench.oracle_readout import TeacherReadout, install, main


def test_readout_gives_each_clip_the_teachers_pooled_states_whatever_its_batch(world: dict[str, Path]) -> None:  # noqa: F811
    t = Trainer(_config(world, "oracle_vectors", distill_loss="none"))
    audio_cfg = t.student.audio_layer.config
    readout = install(t)
    assert isinstance(t.student.audio_layer, TeacherReadout) and readout.layer == len(t.teacher_encoder.layers) - 1
    readout.eval()
    ex = t.examples
    batch = collate([ex[0], ex[1], ex[2]], t.pad_id)
    with torch.no_grad():
        vectors, lengths = readout(batch.features, batch.frame_lengths)
        for i, e in enumerate(ex[:3]):
            assert int(lengths[i]) == audio_cfg.num_tokens(e.num_frames) == e.num_audio_tokens  # the student's layout
            alone, n_alone = readout(batch.features[i : i + 1, :, : e.num_frames], batch.frame_lengths[i : i + 1])
            torch.testing.assert_close(vectors[i, : int(lengths[i])], alone[0], rtol=0, atol=1e-5)
            assert int(vectors[i, int(lengths[i]):].abs().sum()) == 0  # nothing past the clip
            # independently: the teacher's last block on the clip's own frames, pooled by the stack factor
            n = e.num_frames
            hs = encoder_states(t.teacher_encoder, batch.features[i : i + 1, :, :n], [readout.layer])[readout.layer][0]
            want = readout.proj(readout.norm(pool_frames(hs, (n + 1) // 2, audio_cfg.frames_per_token)))
            torch.testing.assert_close(alone[0], want, rtol=0, atol=1e-5)


def test_training_moves_the_readout_and_lora_never_the_teacher(world: dict[str, Path]) -> None:  # noqa: F811
    t = Trainer(_config(world, "oracle_step", steps=3))
    readout = install(t)
    optimized = {id(p) for g in t.optimizer.param_groups for p in g["params"]}
    assert {id(p) for p in readout.proj.parameters()} <= optimized
    assert not {id(p) for p in t.teacher_encoder.parameters()} & optimized
    assert {id(p) for p in t.params} == optimized
    teacher_before = {k: v.clone() for k, v in t.teacher_encoder.state_dict().items()}
    proj_before = readout.proj.weight.detach().clone()
    lora_before = {n: p.detach().clone() for n, p in t.student.named_parameters() if p.requires_grad and "lora_" in n}
    assert lora_before
    for step in range(3):
        rec = t.train_step(step)
        assert torch.isfinite(torch.tensor(rec["loss"]))
    for k, v in t.teacher_encoder.state_dict().items():
        torch.testing.assert_close(v, teacher_before[k], rtol=0, atol=0, msg=k)
    assert not torch.equal(readout.proj.weight, proj_before)
    params = dict(t.student.named_parameters())
    assert any(not torch.equal(params[n], v) for n, v in lora_before.items())
    assert not readout.encoder.training  # train mode never reaches the teacher (no dropout)


def test_cli_trains_evaluates_and_resumes(world: dict[str, Path], tmp_path: Path,  # noqa: F811
                                          capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(world, "oracle_cli", steps=2)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("lora_rank: 4\nlora_alpha: 8\nlr: 3.0e-3\nwarmup_steps: 0\nlog_every: 1\n"
                      "save_every: 0\neval_every: 0\nctc_weight: 0.5\nprogress: false\nseed: 3\n")
    work = tmp_path / "work"
    common = ["--config", str(recipe), "--student", str(cfg.student), "--teacher", str(cfg.teacher),
              "--manifest", str(cfg.manifest), "--eval-manifest", str(cfg.manifest), "--batch-size", "2",  # `aura train`'s flags
              "--teacher-cache", str(cfg.teacher_cache), "--work-dir", str(work), "--threads", "1"]
    assert main([*common, "--steps", "2", "--teacher-layer", "7"]) == 2  # the tiny teacher has blocks 0..1
    assert "--teacher-layer 7: the teacher has blocks 0..1" in capsys.readouterr().err
    assert main([*common, "--steps", "2"]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["step"] == 2 and "eval_ce" in first and "eval_ctc_wer" in first
    assert [p.name for p in sorted(work.glob("ckpt-*.pt"))] == ["ckpt-0000002.pt"]
    assert not (work / "not-exported").exists()  # a diagnostic: the teacher is in it, nothing is exported
    assert main([*common, "--steps", "3"]) == 0  # resumes from step 2, trains one more
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert second["step"] == 3
    steps = [json.loads(line)["step"] for line in (work / "train_log.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3]
