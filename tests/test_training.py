"""AuRA trainer on tiny random models: it learns, resumes exactly, exports a servable adapter.

The student is a tiny random Llama with the real SmolLM2 tokenizer (``tiny_models``); the
teacher is a tiny random Whisper built here (d_model 64). Audio is real speech from espeak-ng.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from audio_helpers import speak
from tiny_models import make_tiny_llama, save_smollm2_tokenizer

from adapters.adapter import AUDIO_WEIGHTS, LORA_WEIGHTS, init_adapter, load_adapter
from adapters.audio import load_audio_file
from adapters.audio_layer import EncoderMerge
from adapters.base_model import read_base_model
from adapters.features import log_mel
from adapters.prompt import build_prompt, user_turn
from adapters.training.config import TrainConfig, load_train_config
from adapters.training.data import ManifestRow, read_manifest, row_prompt_text
from adapters.training.trainer import BEST_FILE, ConfigError, Trainer, default_layer_map, split_validation
from adapters.validate import validate_adapter

CLIPS = [
    ("transcribe", "The little dog ran home.", None),
    ("qa", "What is the capital of France?", "The capital of France is Paris."),
    ("transcribe", "A blue car stopped.", None),
    ("qa", "What color is grass?", "Grass is green."),
]


def make_tiny_whisper(out_dir: Path) -> Path:
    """A random Whisper with the real stem layout (80 mels, conv k=3) at width 64, 6 s context."""
    from transformers import WhisperConfig, WhisperModel

    config = WhisperConfig(
        vocab_size=128, d_model=64, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=80,
        max_source_positions=300, max_target_positions=64, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, decoder_start_token_id=1,
    )
    torch.manual_seed(0)
    WhisperModel(config).save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("aura_train")
    tok = save_smollm2_tokenizer(root / "tok")
    student = make_tiny_llama(root / "student", tok, num_layers=4)
    teacher = make_tiny_whisper(root / "teacher")
    data = root / "data"
    (data / "audio").mkdir(parents=True)
    rows = []
    for i, (task, text, response) in enumerate(CLIPS):
        speak(text, data / "audio" / f"c{i}.wav", voice="en-us", speed=220)
        row = {"audio": f"audio/c{i}.wav", "task": task, "text": text}
        if response:
            row["response"] = response
        rows.append(row)
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"root": root, "student": student, "teacher": teacher, "manifest": data / "train.jsonl"}


def _config(world: dict[str, Path], name: str, **kw) -> TrainConfig:
    base = dict(student=world["student"], teacher=world["teacher"], manifest=world["manifest"],
                output=world["root"] / name / "adapter", work_dir=world["root"] / name / "work",
                teacher_cache=world["root"] / "teacher_cache", lora_rank=4, lora_alpha=8,
                batch_size=2, steps=8, lr=3e-3, warmup_steps=0, log_every=1, eval_every=0, save_every=0,
                progress=False, seed=3)
    base.update(kw)
    return TrainConfig.model_validate(base)


def test_default_layer_map_spreads_over_early_layers() -> None:
    assert default_layer_map(30, 4) == {1: 0, 4: 1, 6: 2, 9: 3}
    m = default_layer_map(4, 2)
    assert sorted(m.values()) == [0, 1] and max(m) < 4


def test_few_steps_lower_the_loss(world: dict[str, Path]) -> None:
    trainer = Trainer(_config(world, "learn", steps=10))
    losses = [trainer.train_step(s)["loss"] for s in range(10)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-2:]) / 2 < 0.8 * sum(losses[:2]) / 2, losses


def test_checkpoint_resume_matches_uninterrupted_run(world: dict[str, Path]) -> None:
    straight = Trainer(_config(world, "straight", steps=6))
    straight.train()
    interrupted = Trainer(_config(world, "resumed", steps=6, save_every=2))
    interrupted.train(stop_after=3)  # "killed" after step 3; newest checkpoint is from step 2... or 3
    assert interrupted.checkpoints(), "no checkpoint written"
    resumed = Trainer(_config(world, "resumed", steps=6, save_every=2))
    first = resumed.load_checkpoint(resumed.checkpoints()[-1])
    assert first == 3
    resumed.train()
    a, b = straight.student.trainable_state(), resumed.student.trainable_state()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    # the loss of every step after the resume point equals the uninterrupted run's
    la = {h["step"]: h["loss"] for h in straight.history if "loss" in h}
    lb = {h["step"]: h["loss"] for h in resumed.history if "loss" in h}
    for step in (4, 5, 6):
        assert la[step] == pytest.approx(lb[step], abs=1e-6)
    # and the very next step (beyond the run) agrees too
    straight.config = straight.config.model_copy(update={"steps": 7})
    resumed.config = resumed.config.model_copy(update={"steps": 7})
    assert straight.train_step(6)["loss"] == pytest.approx(resumed.train_step(6)["loss"], abs=1e-6)


@pytest.mark.parametrize(("blocks", "lookahead", "stride", "merge", "ranks"),
                         [(0, 0, 1, "mean", None), (1, 0, 1, "mean", None), (1, 2, 1, "mean", None),
                          (1, 2, 2, "mean", None), (1, 2, 2, "linear", None), (0, 0, 1, "mean", {0: 8})],
                         ids=["stem", "block", "block_lookahead", "block_stride", "block_merge", "rank_layers"])
def test_export_validates_and_reference_engine_reproduces_trainer_tokens(world: dict[str, Path], blocks: int,
                                                                         lookahead: int, stride: int, merge: EncoderMerge,
                                                                         ranks: dict[int, int] | None) -> None:
    from transformers import AutoTokenizer

    from server.engine.base import GenerationRequest, LoraHandle, SamplingOptions
    from server.engine.reference import ReferenceEngine

    # at stride 2, stack_factor 2 keeps four stem frames per token, so the teacher's targets pool as before
    trainer = Trainer(_config(world, f"export{blocks}{lookahead}{stride}{merge}{bool(ranks)}", steps=6, lr=5e-3,
                              audio_encoder_layers=blocks, audio_encoder_lookahead=lookahead,
                              audio_encoder_stride=stride, audio_encoder_merge=merge, stack_factor=4 // stride,
                              lora_rank_layers=ranks))
    result = trainer.run()
    out = result.output
    config = validate_adapter(out, base=read_base_model(world["student"]), max_lora_rank=16)
    assert config.trained is True
    assert config.audio_layer.encoder_layers == blocks and config.audio_layer.encoder_lookahead == lookahead
    assert config.audio_layer.encoder_stride == stride and config.audio_layer.frames_per_token == 4
    assert config.audio_layer.encoder_merge == merge
    if merge == "linear":  # the merge trained (gradient reaches it) and what trained is what was exported
        with safe_open(str(out / AUDIO_WEIGHTS), framework="pt") as f:
            exported = f.get_tensor("merge.weight")
        mean = torch.eye(exported.shape[0]).repeat(1, stride) / stride
        assert (exported - mean).abs().max() > 1e-4
        torch.testing.assert_close(exported, trainer.student.audio_layer.merge.weight.detach().float())
    if ranks:  # block 0 at rank 8 over lora_rank 4, at the same scale: PEFT's rank_pattern / alpha_pattern
        assert load_adapter(out).lora_rank == 8
        with safe_open(str(out / LORA_WEIGHTS), framework="pt") as f:
            got = {k: f.get_slice(k).get_shape()[0] for k in f.keys() if "lora_A" in k}
        assert got and all(r == (8 if ".layers.0." in k else 4) for k, r in got.items()), got
    t = config.training
    assert t["steps"] == 6 and t["layer_map"] and t["teacher"]["fingerprint"].startswith("sha256:")
    assert "ce" in t["losses"]["final"] and "distill" in t["losses"]["final"]
    assert not any(p.name.startswith("heads") for p in out.iterdir())

    # the trainer model's own greedy tokens on a training clip
    ex = trainer.examples[0]
    eos = {trainer.tokenizer.eos_token_id}
    trainer.student.eval()
    want = trainer.student.greedy(ex.prompt_ids, ex.audio_start, ex.features, ex.num_frames, max_new_tokens=12, eos_ids=eos)
    # ... and what the server path makes of the exported folder
    adapter = load_adapter(out)
    tok = AutoTokenizer.from_pretrained(str(world["student"]))
    samples = torch.from_numpy(load_audio_file(ex.audio_path).samples.copy())
    feats, frames = log_mel([samples], adapter.config.features)
    emb, n = adapter.audio_layer(feats, frames)
    row = trainer.setup.rows[0]
    prompt = build_prompt(tok, adapter.config.prompt, [user_turn(int(n[0]), row_prompt_text(row, trainer.config.transcribe_prompt))])
    assert prompt.token_ids == ex.prompt_ids
    engine = ReferenceEngine(model=str(world["student"]), tokenizer=tok)
    engine.eos_ids = eos

    async def go() -> list[int]:
        handle = LoraHandle("demo", 1, out)
        await engine.add_lora(handle)
        req = GenerationRequest("r1", prompt.token_ids, prompt.is_token_ids, emb[0, : int(n[0])].detach(),
                                SamplingOptions(max_tokens=12), handle)
        got: list[int] = []
        async for chunk in engine.generate(req):
            got += chunk.token_ids
        return got

    assert asyncio.run(go()) == want


def test_audio_layer_blocks_start_as_the_teachers_first_block_seen_causally(world: dict[str, Path]) -> None:
    """audio_encoder_layers copies the teacher's stem and first blocks; a causal block's output at
    frame i is then exactly the teacher's block on the audio up to frame i (its last position)."""
    from adapters.audio_layer import sinusoids
    from adapters.training.teacher import encoder_states, lookahead_mask

    trainer = Trainer(_config(world, "blocks", audio_encoder_layers=1))
    audio, teacher = trainer.student.audio_layer, trainer.teacher_encoder
    assert len(audio.blocks) == 1 and audio.config.encoder_heads == 2
    torch.testing.assert_close(audio.conv2.weight, teacher.conv2.weight)
    ex = trainer.examples[0]
    with torch.no_grad():
        f = torch.nn.functional
        stem = f.gelu(teacher.conv2(f.gelu(teacher.conv1(ex.features[None].float())))).transpose(1, 2)
        frames = min(stem.shape[1], 120)
        positions = teacher.embed_positions.weight[:frames]
        torch.testing.assert_close(sinusoids(frames, positions.shape[1]), positions, rtol=0, atol=1e-4)
        x = stem[:, :frames] + positions
        ours = audio.blocks[0](x, torch.tensor([frames]))
        def teacher_block(upto: int) -> torch.Tensor:
            out = teacher.layers[0](x[:, :upto], None)
            return out[0] if isinstance(out, tuple) else out

        assert frames > 40
        for end in (1, 17, frames // 2, frames):
            torch.testing.assert_close(ours[0, end - 1], teacher_block(end)[0, -1], rtol=1e-4, atol=1e-4)
        assert not torch.allclose(ours[0, 0], teacher_block(frames)[0, 0], atol=1e-3), "causal, not bidirectional"
        # with lookahead, the block is the teacher's under bench/probe_lookahead.py's mask (what the probes measured)
        look = Trainer(_config(world, "blocks_la", audio_encoder_layers=1, audio_encoder_lookahead=3)).student.audio_layer
        out = teacher.layers[0](x, lookahead_mask(frames, 3, x.dtype, x.device))
        torch.testing.assert_close(look.blocks[0](x, torch.tensor([frames])), out[0] if isinstance(out, tuple) else out,
                                   rtol=1e-4, atol=1e-4)
        # with a stride, the blocks run on the mean of stem-frame pairs: the teacher's block the way
        # bench/probe_lookahead.py --stride runs it (encoder_states), end to end from the clip's features
        strided = Trainer(_config(world, "blocks_s2", audio_encoder_layers=1, audio_encoder_lookahead=3,
                                  audio_encoder_stride=2, stack_factor=2)).student.audio_layer
        seen: list[torch.Tensor] = []
        strided.blocks[0].register_forward_hook(lambda _m, _i, o: seen.append(o))
        strided(ex.features[None].float(), torch.tensor([ex.num_frames]))
        want = encoder_states(teacher, ex.features[None, :, : ex.num_frames].float(), [0], lookahead=3, stride=2)[0]
        assert seen[0].shape == want.shape and want.shape[1] == -(-((ex.num_frames + 1) // 2) // 2)
        torch.testing.assert_close(seen[0], want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="only 2 blocks"):
        Trainer(_config(world, "blocks3", audio_encoder_layers=3))
    with pytest.raises(ConfigError, match="teacher's width"):
        Trainer(_config(world, "blocks_w", audio_encoder_layers=1, conv_channels=32))
    fresh, one = _config(world, "fp"), _config(world, "fp", audio_encoder_layers=1)
    assert fresh.fingerprint() != one.fingerprint(), "a run must not resume into another audio layer"


def test_pretrained_audio_blocks_learn_at_their_own_rate(world: dict[str, Path]) -> None:
    """audio_encoder_lr_scale: 0 keeps the teacher's blocks as they are while the rest trains."""
    moved = {}
    for scale in (0.0, 1.0):
        trainer = Trainer(_config(world, f"lr_scale{scale}", audio_encoder_layers=1, audio_encoder_lr_scale=scale, steps=2))
        audio = trainer.student.audio_layer
        before = {k: v.detach().clone() for k, v in audio.state_dict().items()}
        for step in range(2):
            trainer.train_step(step)
        fresh, blocks = trainer.optimizer.param_groups
        assert fresh["lr"] > 0 and blocks["lr"] == pytest.approx(scale * fresh["lr"])
        after = audio.state_dict()
        moved[scale] = {k for k in before if not torch.equal(before[k], after[k])}
    assert "proj.weight" in moved[0.0] and "conv1.weight" in moved[0.0]
    assert not any(k.startswith("blocks.") for k in moved[0.0]), moved[0.0]
    assert "blocks.0.fc1.weight" in moved[1.0]


def test_validation_holds_back_whole_sentences(world: dict[str, Path]) -> None:
    rows = read_manifest(world["manifest"], check_audio=False)
    # a question's transcription row speaks the same sentence as its qa row: both leave training together
    rows.append(ManifestRow(audio=rows[1].audio, task="transcribe", text=rows[1].text))
    drawn = set()
    for seed in range(8):
        train, val = split_validation(rows, 2, seed)
        assert len({r.text for r in val}) == 2 and not {r.text for r in val} & {r.text for r in train}
        assert len(train) + len(val) == len(rows)
        assert split_validation(rows, 2, seed) == (train, val)  # a pure function of the seed
        drawn |= {r.text for r in val}
        if rows[1].text in {r.text for r in val}:
            assert sum(r.text == rows[1].text for r in val) == 2
    assert len(drawn) > 2  # seeds draw different sentences
    assert split_validation(rows, 0, 0) == (rows, [])
    with pytest.raises(ConfigError, match="val_sentences=4: the manifest has 4 distinct sentences; hold back fewer"):
        Trainer(_config(world, "val_all", val_sentences=4))


def test_fit_examples_log_a_fixed_training_sample_beside_the_held_out_rows(world: dict[str, Path]) -> None:
    """``fit_examples``: at every evaluation the loss terms of a seeded sample of the training rows, as ``fit_<term>``,
    measured as the held-out rows are; bookkeeping, so the run's fingerprint does not change with it."""
    t = Trainer(_config(world, "fit_log", fit_examples=2, steps=4, eval_every=2, lr=5e-3))
    assert len(t.fit_examples) == 2 and all(any(f is e for e in t.examples) for f in t.fit_examples)
    again = Trainer(_config(world, "fit_log_again", fit_examples=2))
    assert [e.key for e in again.fit_examples] == [e.key for e in t.fit_examples]  # the seed's sample, every time
    every = Trainer(_config(world, "fit_log_all", fit_examples=99))
    assert [e.key for e in every.fit_examples] == [e.key for e in every.examples]  # never more than there are
    assert _config(world, "x", fit_examples=2).fingerprint() == _config(world, "x").fingerprint()
    t.train()
    ev = t.final_evaluation(4)
    logged = [h for h in t.history if "fit_ce" in h]
    assert [h["step"] for h in logged] == [2, 4]  # step 2 during training, the last step by the final evaluation
    assert ev is not None and not any(k.startswith("eval_") or k.startswith("val_") for k in ev)  # only fit here
    t.student.eval()
    with torch.no_grad():
        own = [float(t._losses([i], t.fit_examples, {})["ce"]) for i in range(2)]
    assert ev["fit_ce"] == pytest.approx(sum(own) / 2, abs=1e-4)  # the mean over the sample, example by example
    assert ev["fit_ce"] != pytest.approx(logged[0]["fit_ce"], abs=1e-4)  # and it moves as the run trains


def test_export_takes_the_best_validated_step_and_a_resume_keeps_the_record(world: dict[str, Path]) -> None:
    trainer = Trainer(_config(world, "val_pick", val_sentences=1, steps=6, eval_every=2, save_every=2, lr=5e-3))
    assert len(trainer.val_examples) == 1 and len(trainer.examples) == 3
    trainer.train()
    ev = trainer.final_evaluation(6)
    assert ev is not None and "val_ce" in ev and not any(k.startswith("eval_") for k in ev)  # no eval_manifest here
    vals = {h["step"]: h["val_ce"] for h in trainer.history if "val_ce" in h}
    assert sorted(vals) == [2, 4, 6]
    best = min(vals, key=lambda k: vals[k])
    assert trainer.best == {"step": best, "metric": "val_ce", "value": vals[best]}
    assert [h["val_best"] for h in trainer.history if "val_ce" in h][[2, 4, 6].index(best)] is True

    resumed = Trainer(_config(world, "val_pick", val_sentences=1, steps=6, eval_every=2, save_every=2, lr=5e-3))
    resumed.load_checkpoint(resumed.checkpoints()[-1])
    assert resumed.best == trainer.best

    # the weights drift after the best step (as an over-fitting run's do): the export still takes the best step's
    with torch.no_grad():
        for p in trainer.student.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    assert trainer.validate()["val_ce"] != pytest.approx(vals[best], abs=1e-4)
    out = trainer.export(ev)
    assert trainer.validate()["val_ce"] == pytest.approx(vals[best], abs=1e-5)
    saved = torch.load(trainer.work_dir / BEST_FILE, weights_only=False)["trainable"]
    exported = load_adapter(out).audio_layer.state_dict()
    audio = {k.removeprefix("audio_layer."): v for k, v in saved.items() if k.startswith("audio_layer.")}
    assert audio and all(torch.equal(exported[k].float(), v.float()) for k, v in audio.items())
    t = load_adapter(out).config.training
    assert t["selected"] == {"step": best, "metric": "val_ce", "value": vals[best], "val_sentences": 1, "val_rows": 1,
                             "last_step": 6}
    assert t["losses"]["eval"]["step"] == best and t["data"]["rows"] == 3

    # a record that does not match best.pt (killed between the two writes) exports the last step, not a failure
    resumed.best = {**resumed.best, "step": 99}
    assert load_adapter(resumed.export()).config.training["selected"] is None


def test_without_validation_the_last_step_is_exported(world: dict[str, Path]) -> None:
    trainer = Trainer(_config(world, "val_none", steps=2, eval_every=1))
    result = trainer.run()
    assert trainer.best is None and not (trainer.work_dir / BEST_FILE).exists()
    assert load_adapter(result.output).config.training["selected"] is None


def test_layer_map_out_of_range_fails_early(world: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="student layer 7 is out of range"):
        Trainer(_config(world, "bad1", layer_map={7: 0}))
    with pytest.raises(ConfigError, match="teacher layer 5 is out of range"):
        Trainer(_config(world, "bad2", layer_map="1:5"))


def test_lookahead_or_stride_without_blocks_fails_early(world: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="audio_encoder_lookahead .* needs audio_encoder_layers > 0"):
        Trainer(_config(world, "badlook", audio_encoder_lookahead=4))
    with pytest.raises(ConfigError, match="audio_encoder_stride .* needs audio_encoder_layers > 0"):
        Trainer(_config(world, "badstride", audio_encoder_stride=2))
    with pytest.raises(ConfigError, match="audio_encoder_merge='linear' .* needs audio_encoder_stride > 1"):
        Trainer(_config(world, "badmerge", audio_encoder_layers=1, audio_encoder_merge="linear"))


def test_lora_rank_layers_out_of_range_fails_early(world: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="lora_rank_layers: blocks \\[7\\] are out of range"):
        Trainer(_config(world, "badranks", lora_rank_layers={7: 8}))


def test_hidden_size_mismatch_fails_early(world: dict[str, Path], tmp_path: Path) -> None:
    other = make_tiny_llama(tmp_path / "other", world["root"] / "tok", hidden_size=64, num_layers=2)
    adapter = init_adapter(other, tmp_path / "other_adapter", rank=4, conv_channels=64)
    with pytest.raises(ConfigError, match="hidden size mismatch"):
        Trainer(_config(world, "bad3", init_from=adapter))


def test_missing_audio_file_fails_early(world: dict[str, Path], tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"audio": "nope.wav", "task": "transcribe", "text": "x"}) + "\n")
    with pytest.raises(FileNotFoundError, match=r"m.jsonl:1: audio file .*nope.wav does not exist"):
        Trainer(_config(world, "bad4", manifest=manifest))


def test_qa_row_without_response_and_bad_targets_fail_early(world: dict[str, Path], tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    audio = world["manifest"].parent / "audio" / "c0.wav"
    manifest.write_text(json.dumps({"audio": str(audio), "task": "qa", "text": "x"}) + "\n")
    with pytest.raises(ConfigError, match="aura data responses"):
        Trainer(_config(world, "bad5", manifest=manifest))
    with pytest.raises(ConfigError, match="not linear modules"):
        Trainer(_config(world, "bad6", lora_targets="q_proj,nonsense"))


def test_yaml_config_and_cli_overrides(world: dict[str, Path], tmp_path: Path) -> None:
    import argparse

    from adapters.cli import add_commands

    yaml_file = tmp_path / "train.yaml"
    yaml_file.write_text(f"student: {world['student']}\nteacher: {world['teacher']}\nmanifest: {world['manifest']}\n"
                         "output: out/adapter\nsteps: 5\nlayer_map: {0: 1, 2: 0}\n")
    cfg = load_train_config(yaml_file, {"steps": "9", "distill_loss": "mse"})
    assert cfg.steps == 9 and cfg.distill_loss == "mse" and cfg.layer_map == {0: 1, 2: 0}
    assert cfg.output == tmp_path / "out" / "adapter"
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["train", "--config", str(yaml_file), "--layer-map", "3:9", "--no-resume"])
    assert args.func(args) == 2  # teacher layer 9 does not exist: a clear error, exit code 2
    # the same flags outside `aura train` (DDP, bench diagnostics): defaults fill only what neither the YAML nor a flag sets
    from adapters.training.config import add_config_flags, config_from_flags

    flags = argparse.ArgumentParser()
    add_config_flags(flags)
    cfg = config_from_flags(flags.parse_args(["--config", str(yaml_file), "--steps", "7"]),
                            {"output": tmp_path / "elsewhere", "steps": 1, "lr": 0.5})
    assert cfg.output == tmp_path / "out" / "adapter" and cfg.steps == 7 and cfg.lr == 0.5
