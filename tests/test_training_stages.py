"""The recipe's levers: CTC alignment loss (sub-words and characters), the truncated first stage, the short-context teacher.

Each test is built to fail when the lever is wired wrong: CTC must learn a toy alignment and be
decodable by best path; the truncated stage must send gradient to the audio layer through the
CTC head while the blocks above ``max_layer`` never run; the short-context teacher must leave
the original encoder untouched and agree with it when the context is the full one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from test_training import world  # noqa: F401  (the tiny student/teacher/espeak-ng world, session-scoped)
from audio_helpers import speak

from adapters.features import FeatureConfig
from adapters.training.config import TrainConfig
from adapters.training.ctc import CHAR_SLOTS, CHARS, ctc_loss, decode_chars, encode_chars, greedy_ctc, normalize_chars
from adapters.training.student import decoder_layers
from adapters.training.teacher import encoder_states, load_teacher_encoder, teacher_targets
from adapters.training.trainer import ConfigError, Trainer


def _interrupted_run(world: dict[str, Path], name: str, *, stop_after: int, **kw: object) -> Trainer:
    """A run stopped after ``stop_after`` steps, then resumed by a new Trainer to its ``steps``."""
    first = Trainer(_config(world, name, **kw))
    assert first.train(stop_after=stop_after) == stop_after
    del first
    second = Trainer(_config(world, name, **kw))
    assert second.train() == kw["steps"]
    return second


def _assert_same_weights(a: Trainer, b: Trainer) -> None:
    """Bit-identical trainable weights."""
    for (name, x), (_, y) in zip(sorted(a.student.trainable_state().items()), sorted(b.student.trainable_state().items())):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")


def test_ctc_learns_a_toy_alignment_and_best_path_decodes_it() -> None:
    torch.manual_seed(0)
    vocab, blank, n_pos = 12, 0, 10
    targets = [[3, 5, 5, 7], [2, 9, 4]]
    lengths = torch.tensor([10, 8])
    feats = torch.randn(2, n_pos, 16)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, vocab))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(300):
        loss = ctc_loss(model(feats), lengths, targets, blank)
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.05 * first
    assert greedy_ctc(model(feats), lengths, blank) == targets  # incl. the repeated 5 (needs a blank between)


def test_ctc_ignores_positions_past_each_length() -> None:
    torch.manual_seed(1)
    logits = torch.randn(2, 9, 6, requires_grad=True)
    loss = ctc_loss(logits, torch.tensor([9, 5]), [[1, 2], [3]], blank=0)
    loss.backward()
    assert logits.grad[1, 5:].abs().max() == 0 and logits.grad[1, :5].abs().max() > 0


def test_ctc_over_a_large_vocabulary_is_the_full_softmax_ctc_in_value_and_gradient() -> None:
    """``ctc_loss`` runs a large vocabulary's CTC on the classes the transcripts use; it must give the loss and the
    gradient of the CTC of the full log-softmax: with repeats (which need a blank between), an empty transcript,
    a clip too short for its transcript (counts zero) and positions past a clip's length."""
    torch.manual_seed(2)
    vocab, blank = 3000, 2999
    targets = [[5, 17, 17, 2048], [], [7, 8, 9, 10, 11, 12], [1234, 5, 1234]]
    lengths = torch.tensor([12, 6, 5, 9])  # the third needs 6 positions: impossible
    logits = (3 * torch.randn(4, 12, vocab)).requires_grad_()
    ref_logits = logits.detach().clone().requires_grad_()
    got = ctc_loss(logits, lengths, targets, blank)
    flat = torch.tensor([t for seq in targets for t in seq])
    want = torch.nn.functional.ctc_loss(torch.log_softmax(ref_logits, -1).transpose(0, 1), flat, lengths,
                                        torch.tensor([len(t) for t in targets]), blank=blank, zero_infinity=True)
    got.backward()
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-4, atol=1e-6)  # of gradients up to 0.25
    assert logits.grad[2].abs().max() == 0 and logits.grad[1, 6:].abs().max() == 0 and logits.grad[0].abs().max() > 0


def _config(world: dict[str, Path], name: str, **kw: object) -> TrainConfig:
    base = dict(student=world["student"], teacher=world["teacher"], manifest=world["manifest"], eval_manifest=world["manifest"],
                output=world["root"] / name / "adapter", teacher_cache=world["root"] / "tcache", lora_rank=4, steps=30,
                batch_size=4, lr=3e-3, warmup_steps=2, log_every=5, eval_every=0, save_every=0, progress=False,
                threads=1, layer_map={0: 0, 1: 1})
    base.update(kw)
    return TrainConfig.model_validate(base)


def test_truncated_stage_runs_only_the_low_blocks_and_ctc_reaches_the_audio_layer(world: dict[str, Path]) -> None:
    trainer = Trainer(_config(world, "trunc", max_layer=1, ctc_weight=1.0, distill_loss="none", tasks="transcribe"))
    assert trainer.ctc_layer == 1 and not trainer.use_ce
    assert {e.task for e in trainer.examples} == {"transcribe"}  # curriculum: qa rows left out
    calls = {i: 0 for i in range(4)}
    blocks = decoder_layers(trainer.student.causal_lm)
    hooks = [b.register_forward_hook(lambda m, i, o, k=k: calls.__setitem__(k, calls[k] + 1)) for k, b in enumerate(blocks)]
    terms = trainer._losses([0, 1], trainer.examples, {})
    for h in hooks:
        h.remove()
    assert calls == {0: 1, 1: 1, 2: 0, 3: 0}
    assert set(terms) == {"ctc", "loss"}
    trainer.student.zero_grad()
    terms["loss"].backward()
    audio_grad = sum(float(p.grad.abs().sum()) for p in trainer.student.audio_layer.parameters() if p.grad is not None)
    assert audio_grad > 0
    high_lora = [p for n, p in trainer.student.named_parameters() if p.requires_grad and "lora_" in n and ".layers.3." in n]
    assert high_lora and all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in high_lora)
    assert len(decoder_layers(trainer.student.causal_lm)) == 4  # the full model is back after the pass


def test_truncated_stage_drops_the_positions_after_the_audio_and_reads_the_same_states(world: dict[str, Path]) -> None:
    """A truncated stage runs its blocks only up to the batch's last audio position (the prompt's tail and the
    transcript cannot reach audio positions through causal blocks); the audio-position states and CTC logits
    must be those of the whole sequence, for every example of a batch of unequal clips."""
    from adapters.training.data import collate, with_features_batch

    trainer = Trainer(_config(world, "trunc_exact", max_layer=1, ctc_weight=1.0, char_ctc_weight=1.0, char_ctc_layer=0,
                              tasks="transcribe", steps=1))
    idx = sorted(range(len(trainer.examples)), key=lambda i: trainer.examples[i].num_audio_tokens)[:: max(1, len(trainer.examples) // 3)][:3]
    chosen = with_features_batch([trainer.examples[i] for i in idx], trainer.setup.features)
    assert len({e.num_audio_tokens for e in chosen}) > 1, "the batch needs clips of unequal length"
    batch = collate(chosen, trainer.pad_id)
    ends = [e.audio_start + e.num_audio_tokens for e in chosen]
    widths: list[int] = []
    hook = decoder_layers(trainer.student.causal_lm)[0].register_forward_hook(lambda m, i, o: widths.append(
        (o[0] if isinstance(o, tuple) else o).shape[1]))
    student = trainer.student.eval()
    with torch.no_grad():
        cut = student(batch, max_layer=1, ctc_layer=1, char_layer=0)
        whole = student(batch, max_layer=None, ctc_layer=1, char_layer=0)
    hook.remove()
    assert widths == [max(ends), batch.input_ids.shape[1]] and max(ends) < batch.input_ids.shape[1]
    torch.testing.assert_close(cut.ctc_logits, whole.ctc_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cut.char_logits, whole.char_logits, rtol=1e-4, atol=1e-4)
    for layer in cut.audio_hidden:
        torch.testing.assert_close(cut.audio_hidden[layer], whole.audio_hidden[layer], rtol=1e-4, atol=1e-4)
    assert torch.equal(cut.audio_mask, whole.audio_mask)


def test_character_targets_spell_the_transcript_and_decode_back() -> None:
    ids = encode_chars("It's 5 o'clock,  Mr. Smith!")
    assert 0 not in ids and all(1 <= i <= len(CHARS) for i in ids)  # 0 stays the blank
    assert decode_chars(ids) == normalize_chars("It's 5 o'clock,  Mr. Smith!") == "it's o'clock mr smith"


def test_character_ctc_trains_the_audio_layer_and_the_blocks_up_to_its_layer_only(world: dict[str, Path]) -> None:
    """The character head reads block ``char_ctc_layer``: its loss must reach the audio layer and the
    LoRA of blocks 0..layer through the audio positions, and nothing above; the head is training-only."""
    from adapters.adapter import load_adapter
    from adapters.validate import safetensors_header

    trainer = Trainer(_config(world, "char", max_layer=2, char_ctc_weight=1.0, char_ctc_layer=1, distill_loss="none",
                              tasks="transcribe", steps=1))
    assert trainer.char_layer == 1 and trainer.ctc_layer is None
    terms = trainer._losses([0, 1], trainer.examples, {}, keep_logits=True)
    assert set(terms) == {"char_ctc", "loss", "_char_logits", "_char_lengths"}
    e = trainer.examples[0]
    assert terms["_char_logits"].shape[1:] == (max(trainer.examples[i].num_audio_tokens for i in (0, 1)) * CHAR_SLOTS, len(CHARS) + 1)
    assert int(terms["_char_lengths"][0]) == e.num_audio_tokens * CHAR_SLOTS
    trainer.student.zero_grad()
    terms["loss"].backward()

    def grad(pred: object) -> float:
        return sum(float(p.grad.abs().sum()) for n, p in trainer.student.named_parameters()
                   if p.requires_grad and pred(n) and p.grad is not None)  # type: ignore[operator]

    assert grad(lambda n: n.startswith("audio_layer.")) > 0
    assert grad(lambda n: n.startswith("char_head.")) > 0
    assert grad(lambda n: "lora_" in n and ".layers.0." in n) > 0 and grad(lambda n: "lora_" in n and ".layers.1." in n) > 0
    assert grad(lambda n: "lora_" in n and ".layers.2." in n) == 0  # ran (max_layer 2) but above the head
    trainer.train()
    out = trainer.export()
    exported = [k for f in sorted(Path(out).glob("*.safetensors")) for k in safetensors_header(f, f.name)]
    served = [n for n, p in trainer.student.named_parameters() if p.requires_grad and not n.startswith(("heads.", "char_head."))]
    assert len(exported) == len(served) and not [k for k in exported if "char" in k]  # LoRA + audio layer, no head
    assert load_adapter(out).config.training["stage"]["char_ctc_layer"] == 1


def test_character_ctc_learns_to_spell_the_clips(world: dict[str, Path]) -> None:
    trainer = Trainer(_config(world, "char_learn", max_layer=1, char_ctc_weight=1.0, char_ctc_layer=1, distill_loss="none",
                              steps=40, lr=1e-2))
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert before is not None and after is not None
    assert after["eval_char_ctc"] < 0.7 * before["eval_char_ctc"]
    assert 0.0 <= after["eval_char_cer"] < before["eval_char_cer"]


def test_truncated_stage_learns(world: dict[str, Path]) -> None:
    trainer = Trainer(_config(world, "trunc_learn", max_layer=1, ctc_weight=1.0, distill_weight=0.5, steps=40))
    before = trainer.evaluate(wer=True)
    trainer.train()
    after = trainer.evaluate(wer=True)
    assert before is not None and after is not None
    assert after["eval_ctc"] < 0.7 * before["eval_ctc"] and after["eval_distill"] < before["eval_distill"]
    assert 0.0 <= after["eval_ctc_wer"] <= before["eval_ctc_wer"]
    log = [json.loads(line) for line in (trainer.work_dir / "train_log.jsonl").read_text().splitlines()]
    assert all("elapsed_s" in r and "ctc" in r for r in log)


def test_stage_settings_that_cannot_work_fail_early(world: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="cuts off distilled layer"):
        Trainer(_config(world, "bad1", max_layer=0, layer_map={1: 1}))
    with pytest.raises(ConfigError, match="ctc_layer"):
        Trainer(_config(world, "bad2", max_layer=1, ctc_weight=1.0, ctc_layer=3))
    with pytest.raises(ConfigError, match="grad_accum"):
        Trainer(_config(world, "bad3", batch_size=4, grad_accum=3))
    with pytest.raises(ConfigError, match="char_ctc_layer 2"):
        Trainer(_config(world, "bad4", max_layer=1, char_ctc_weight=1.0, char_ctc_layer=2))


def _audio_distill_config(world: dict[str, Path], name: str, **kw: object) -> TrainConfig:
    """One block at stride 2 (the strided student), only the audio-layer distillation on, towards teacher block 1."""
    base: dict[str, object] = dict(max_layer=1, distill_weight=0.0, audio_distill_weight=1.0, audio_distill_layer=1,
                                   audio_encoder_layers=1, audio_encoder_stride=2, stack_factor=2, audio_encoder_lookahead=2,
                                   tasks="transcribe")
    base.update(kw)
    return _config(world, name, **base)


def test_audio_distillation_compares_the_layers_frames_with_the_teachers_whole_clip_states(world: dict[str, Path]) -> None:
    """The target of each of the audio layer's frames is the teacher's block run on the whole clip, pooled over the
    same stride of stem frames; frames past a clip's end count for nothing, so a batch's loss is its clips' losses
    weighted by their frames; the loss reaches the audio layer and its head and nothing in the LLM."""
    from adapters.audio import load_audio_file
    from adapters.features import log_mel

    trainer = Trainer(_audio_distill_config(world, "adist"))
    assert [s.name for s in trainer.specs] == ["frames"] and trainer.frame_spec.layers == (1,)
    assert trainer.frame_spec.frames == 2
    trainer.student.eval()
    e = trainer.examples[0]
    got = trainer.teacher_targets_for(trainer.examples, "t", [0], {}, trainer.frame_spec)[0]
    samples = torch.from_numpy(load_audio_file(e.audio_path).samples.copy())
    feats, frames = log_mel([samples], trainer.setup.features, pad_to_frames=trainer.setup.teacher.input_frames)
    whole = encoder_states(trainer.teacher_encoder, feats, [1])[1][0]
    valid = (int(frames[0]) + 1) // 2
    pairs = torch.nn.functional.pad(whole[:valid], (0, 0, 0, valid % 2)).view(-1, 2, whole.shape[-1])
    want = pairs.sum(1) / torch.tensor([2.0] * (valid // 2) + [1.0] * (valid % 2))[:, None]
    torch.testing.assert_close(got[0], want, rtol=1e-4, atol=1e-4)
    own, counts = trainer.student.audio_layer.frames(e.features[None], torch.tensor([e.num_frames]))
    assert int(counts[0]) == got.shape[1] == own.shape[1]

    with torch.no_grad():
        alone = [float(trainer._losses([i], trainer.examples, {})["audio_distill"]) for i in (0, 1)]
        both = float(trainer._losses([0, 1], trainer.examples, {})["audio_distill"])
    n = [trainer.frame_spec.count(trainer.examples[i]) for i in (0, 1)]
    assert n[0] != n[1]  # clips of different lengths: the shorter one is padded in the batch
    assert both == pytest.approx((alone[0] * n[0] + alone[1] * n[1]) / sum(n), rel=1e-4)

    terms = trainer._losses([0, 1], trainer.examples, {})
    assert set(terms) == {"audio_distill", "loss"}
    trainer.student.zero_grad()
    terms["loss"].backward()
    grads = {n: float(p.grad.abs().sum()) if p.grad is not None else 0.0
             for n, p in trainer.student.named_parameters() if p.requires_grad}
    for part in ("audio_layer.blocks.0.", "audio_layer.conv2.", "audio_head."):
        assert sum(v for k, v in grads.items() if k.startswith(part)) > 0, part
    assert sum(v for k, v in grads.items() if "lora_" in k) == 0


def test_audio_distillation_learns_and_its_head_is_not_exported(world: dict[str, Path]) -> None:
    from adapters.adapter import load_adapter
    from adapters.validate import safetensors_header

    trainer = Trainer(_audio_distill_config(world, "adist_learn", steps=30, lr=1e-2, audio_encoder_lr_scale=1.0,
                                            distill_targets="centered", distill_stats_clips=4))
    assert list(trainer.target_stats) == ["frames"]
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert before is not None and after is not None
    assert after["eval_audio_distill"] < 0.7 * before["eval_audio_distill"]
    out = trainer.export()
    exported = [k for f in sorted(Path(out).glob("*.safetensors")) for k in safetensors_header(f, f.name)]
    assert exported and not [k for k in exported if "head" in k]
    training = load_adapter(out).config.training
    assert training["audio_distill"] == {"weight": 1.0, "teacher_layer": 1}
    assert "audio_distill" in training["losses"]["final"]


def test_audio_distillation_settings_that_cannot_work_fail_early(world: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="audio_distill_layer 2 is out of range"):
        Trainer(_audio_distill_config(world, "adist_bad1", audio_distill_layer=2))
    with pytest.raises(ConfigError, match="audio_distill_layer chooses"):
        Trainer(_audio_distill_config(world, "adist_bad2", audio_distill_weight=0.0, ctc_weight=1.0))
    with pytest.raises(ConfigError, match="distill_loss: none"):
        Trainer(_audio_distill_config(world, "adist_bad3", distill_loss="none"))


def test_grad_accumulation_gives_the_same_update(world: dict[str, Path]) -> None:
    """batch 4 in one pass vs 2 micro-batches of 2: the same parameters after two steps (fp32),
    within atol 1e-4 (lr 3e-3: a micro-batch left out moves parameters by ~1e-3; AdamW's
    normalisation turns summation-order noise on near-zero gradients into ~1e-5 differences).

    CTC is a mean over examples, so micro-batch means average to the batch mean exactly; the
    token-weighted losses (distillation, next-token) weigh micro-batches by their token counts,
    which is close but not identical, so they are off here.
    """
    out = []
    for accum in (1, 2):
        t = Trainer(_config(world, f"accum{accum}", grad_accum=accum, steps=2, max_layer=1, ctc_weight=1.0,
                            distill_loss="none"))
        t.train()
        out.append({n: p.detach().clone() for n, p in t.student.named_parameters() if p.requires_grad})
    for n in out[0]:
        torch.testing.assert_close(out[0][n], out[1][n], rtol=1e-3, atol=1e-4)


def test_short_context_teacher(world: dict[str, Path], tmp_path: Path) -> None:
    enc = load_teacher_encoder(world["teacher"])
    feats = FeatureConfig()
    clip = speak("A short clip.", tmp_path / "s.wav")
    from adapters.audio import load_audio_file

    x = torch.from_numpy(load_audio_file(tmp_path / "s.wav").samples.copy())
    full = teacher_targets(enc, [x], [0, 1], frames_per_token=4, features=feats, input_frames=600)[0]
    same = teacher_targets(enc, [x], [0, 1], frames_per_token=4, features=feats, input_frames=600, context_frames=600)[0]
    short = teacher_targets(enc, [x], [0, 1], frames_per_token=4, features=feats, input_frames=600, context_frames=200)[0]
    torch.testing.assert_close(full, same)
    assert short.shape == full.shape and not torch.allclose(short, full)
    cos = torch.nn.functional.cosine_similarity(short.flatten(1), full.flatten(1), dim=-1)
    assert float(cos.min()) > 0.5  # the same speech, a little less padding to attend to
    assert enc.embed_positions.num_embeddings == 300 and enc.config.max_source_positions == 300  # untouched
    del clip


def test_teacher_layers_are_each_blocks_own_output_on_every_call(world: dict[str, Path], tmp_path: Path) -> None:
    """Each distillation target is its own block's output, equal to Whisper's own hidden states,
    and stays so on later calls with other context lengths. The old short-encoder copy broke this
    from the second padded length on: every block but the last reported the same tensor."""
    from adapters.audio import load_audio_file

    enc = load_teacher_encoder(world["teacher"])
    feats = FeatureConfig()
    x = torch.randn(2, feats.n_mels, 600)
    with torch.no_grad():
        reference = enc(x, output_hidden_states=True).hidden_states  # fresh encoder, full 30 s input
        mine = encoder_states(enc, x, [0, 1])
    for layer in (0, 1):
        torch.testing.assert_close(mine[layer], reference[layer + 1], rtol=1e-5, atol=1e-5)
    clips = []
    for i, text in enumerate(["A short clip.", "A somewhat longer clip that needs a second window of context."]):
        speak(text, tmp_path / f"c{i}.wav")
        clips.append(torch.from_numpy(load_audio_file(tmp_path / f"c{i}.wav").samples.copy()))
    runs = [teacher_targets(enc, clips, [0, 1], frames_per_token=4, features=feats, input_frames=600, context_frames=200)
            for _ in range(2)]
    for first, again in zip(*runs):
        torch.testing.assert_close(first, again)  # a second call gives the same targets
        rel = (first[0] - first[1]).norm() / first[0].norm()
        assert float(rel) > 0.05, "two teacher layers gave the same target"


def test_teacher_lookahead_limits_what_a_frame_sees(world: dict[str, Path]) -> None:
    """bench/probe_lookahead.py's masks: k = 0 is causal, k lets a frame see k frames ahead and no further, and no
    mask is Whisper as trained. Checked on the blocks' output at frame i when only frames after i + k change."""
    enc = load_teacher_encoder(world["teacher"])
    torch.manual_seed(0)
    x = torch.randn(1, FeatureConfig().n_mels, 200)
    y = torch.randn(1, x.shape[1], x.shape[2])
    i, k = 40, 3  # encoder frame 40; the stem looks one encoder frame (3 mel frames) around each frame
    # mel frames from this one on reach only encoder frames > i + k + 1 through the stem
    cut = 2 * (i + k + 1) + 2
    z = torch.cat([x[..., :cut], y[..., cut:]], dim=-1)
    with torch.no_grad():
        full = [encoder_states(enc, v, [1])[1] for v in (x, z)]
        look = [encoder_states(enc, v, [1], lookahead=k)[1] for v in (x, z)]
        wide = [encoder_states(enc, v, [1], lookahead=k + 2)[1] for v in (x, z)]
        unmasked = encoder_states(enc, x, [1], lookahead=10_000)[1]
    torch.testing.assert_close(unmasked, full[0], rtol=0, atol=1e-6)  # a mask that allows all = none
    # (the test teacher is random, so far frames move frame i by ~5e-4, a hundred times float32's noise here, 5e-7)
    assert float((full[0][0, i] - full[1][0, i]).abs().max()) > 5e-5  # unmasked, frame i hears the change
    torch.testing.assert_close(look[0][0, : i + 1], look[1][0, : i + 1], rtol=0, atol=2e-6)  # k ahead: it does not
    assert float((wide[0][0, i] - wide[1][0, i]).abs().max()) > 5e-5  # two frames more, and it does


def test_teacher_states_of_a_padded_batch_are_each_clips_own_with_lengths(world: dict[str, Path]) -> None:
    """``encoder_states(lengths=...)`` (the oracle's one batched pass): each clip's states up to its own end equal the
    clip run alone, odd and even lengths and a lookahead mask included; without ``lengths`` the padding (here noise,
    as a batch-mate's frames would be) changes them, so the masks are what make them equal."""
    enc = load_teacher_encoder(world["teacher"])
    torch.manual_seed(1)
    n = [200, 131, 57]
    x = torch.randn(len(n), FeatureConfig().n_mels, max(n))  # past each clip's end: noise, not zeros
    lengths = torch.tensor(n)
    for lookahead in (None, 2):
        with torch.no_grad():
            batched = encoder_states(enc, x, [0, 1], lookahead=lookahead, lengths=lengths)
            plain = encoder_states(enc, x, [0, 1], lookahead=lookahead)
            for b, k in enumerate(n):
                alone = encoder_states(enc, x[b : b + 1, :, :k], [0, 1], lookahead=lookahead)
                valid = (k + 1) // 2
                for layer in (0, 1):
                    torch.testing.assert_close(batched[layer][b, :valid], alone[layer][0], rtol=0, atol=2e-5)
                    if k < max(n) and lookahead is None:
                        assert float((plain[layer][b, :valid] - alone[layer][0]).abs().max()) > 1e-3
    with pytest.raises(ValueError, match="stride"):
        encoder_states(enc, x, [0], stride=2, lengths=lengths)


def test_truncated_stage_resumes_exactly(world: dict[str, Path]) -> None:
    """A stage-1 run stopped after 3 steps and resumed equals one that ran 6 steps straight
    (lazy, cached teacher targets and the cumulative clock included)."""
    kw = dict(max_layer=1, ctc_weight=1.0, distill_weight=1.0, teacher_context_frames=200, steps=6, save_every=3,
              char_ctc_weight=0.5, char_ctc_layer=0)
    straight = Trainer(_config(world, "resume_a", **kw))
    straight.train()
    second = _interrupted_run(world, "resume_b", stop_after=3, **kw)
    _assert_same_weights(straight, second)
    log = [json.loads(line) for line in (second.work_dir / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [3, 5, 6] and log[-1]["elapsed_s"] >= log[0]["elapsed_s"]


def test_lazy_features_equal_kept_ones(world: dict[str, Path]) -> None:
    """Large corpora keep only frame counts; the features computed per batch are the same tensors."""
    from adapters.training.data import build_example, with_features, with_features_batch

    t = Trainer(_config(world, "lazy", steps=1))
    e = t.examples[0]
    lazy = build_example(0, t.setup.rows[0], world["manifest"].parent, tokenizer=t.tokenizer, layout=t.setup.layout,
                         features=t.setup.features, audio_layer=t.student.audio_layer.config,
                         transcribe_prompt=t.config.transcribe_prompt, max_response_tokens=64, keep_features=False)
    assert lazy.features is None and (lazy.num_frames, lazy.num_audio_tokens, lazy.prompt_ids) == (e.num_frames, e.num_audio_tokens, e.prompt_ids)
    torch.testing.assert_close(with_features(lazy, t.setup.features).features, e.features)
    # a batch of lazy clips computed together (as the trainer does, on its device) gives each clip's own features
    rows = t.setup.rows[:3]
    lazies = [build_example(i, r, world["manifest"].parent, tokenizer=t.tokenizer, layout=t.setup.layout, features=t.setup.features,
                            audio_layer=t.student.audio_layer.config, transcribe_prompt=t.config.transcribe_prompt,
                            max_response_tokens=64, keep_features=False) for i, r in enumerate(rows)]
    assert len({x.num_frames for x in lazies}) > 1  # different lengths: padding must not leak into a clip's features
    for got, kept in zip(with_features_batch(lazies, t.setup.features), t.examples[:3]):
        torch.testing.assert_close(got.features, kept.features, rtol=1e-5, atol=1e-5)


def test_prefetch_reads_ahead_on_its_thread_and_changes_nothing(world: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """With features recomputed per batch (a large corpus), every clip read after the first step
    happens on the prefetch thread, and the weights equal a run without prefetch bit for bit (the
    read-ahead batch, its clips and its cached teacher targets are exactly the step's own)."""
    import threading

    import adapters.training.data as data
    import adapters.training.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "FEATURES_IN_MEMORY_MAX_ROWS", 0)
    reads: list[str] = []
    real_read = trainer_module.load_audio_file

    def spy(*a: object, **kw: object) -> object:
        reads.append(threading.current_thread().name)
        return real_read(*a, **kw)

    monkeypatch.setattr(trainer_module, "load_audio_file", spy)
    monkeypatch.setattr(data, "load_audio_file", spy)
    kw = dict(max_layer=1, ctc_weight=1.0, distill_weight=1.0, teacher_context_frames=200, steps=5)
    plain = Trainer(_config(world, "prefetch_off", prefetch=False, **kw))
    assert plain.examples[0].features is None
    plain.train()
    ahead = Trainer(_config(world, "prefetch_on", **kw))
    assert ahead.config.prefetch
    reads.clear()  # building the examples read each clip once (for its length)
    assert ahead.train() == 5
    on_thread = sum(name.startswith("aura-prefetch") for name in reads)
    # step 0's batch is read on the main thread (nothing was ahead of it); steps 1-4 (and 5's, ahead) on the thread
    assert len(reads) - on_thread == 4 and on_thread >= 4 * 4
    _assert_same_weights(plain, ahead)


def test_audio_spans_are_written_and_read_per_example_without_a_loop(world: dict[str, Path]) -> None:
    """The batched write of audio vectors into the prompt and the batched read of each block's
    states at the audio positions equal the per-example loops they replace (clips of different
    lengths, so spans start and end in different places and padding must stay zero)."""
    from adapters.training.data import collate, with_features_batch

    t = Trainer(_config(world, "spans", steps=1, ctc_weight=1.0, ctc_layer=2))
    chosen = with_features_batch(t.examples[:4], t.setup.features)
    assert len({e.num_audio_tokens for e in chosen}) > 1 and len({e.audio_start for e in chosen}) >= 1
    batch = collate(chosen, t.pad_id)
    with torch.no_grad():
        embeds, n_tok = t.student.embed(batch.input_ids, batch.features, batch.frame_lengths, batch.audio_starts)
        audio, _ = t.student.audio_layer(batch.features, batch.frame_lengths)
        plain = t.student.causal_lm.get_input_embeddings()(batch.input_ids)
        for b, e in enumerate(chosen):
            s, n = e.audio_start, e.num_audio_tokens
            assert int(n_tok[b]) == n
            torch.testing.assert_close(embeds[b, s : s + n], audio[b, :n], rtol=0, atol=0)
            torch.testing.assert_close(embeds[b, :s], plain[b, :s], rtol=0, atol=0)  # the text around it untouched
            torch.testing.assert_close(embeds[b, s + n :], plain[b, s + n :], rtol=0, atol=0)
        states: dict[int, torch.Tensor] = {}
        blocks = decoder_layers(t.student.causal_lm)
        hooks = [blocks[k].register_forward_hook(lambda m, i, o, k=k: states.__setitem__(k, o[0] if isinstance(o, tuple) else o))
                 for k in (0, 1, 2)]
        out = t.student(batch, ctc_layer=2)
        for h in hooks:
            h.remove()
    n_max = max(e.num_audio_tokens for e in chosen)
    for k, got in [*out.audio_hidden.items(), (2, None)]:
        want = torch.zeros(len(chosen), n_max, states[k].shape[-1])
        for b, e in enumerate(chosen):
            want[b, : e.num_audio_tokens] = states[k][b, e.audio_start : e.audio_start + e.num_audio_tokens]
        if got is not None:
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        else:  # the CTC logits read block 2's states at the same positions
            logits = t.student.causal_lm.lm_head(t.student.causal_lm.model.norm(want))
            mask = torch.arange(n_max)[None, :] < torch.tensor([e.num_audio_tokens for e in chosen])[:, None]
            torch.testing.assert_close(out.ctc_logits[mask], logits[mask], rtol=1e-6, atol=1e-6)


def test_time_budget_stops_saves_and_ends_at_the_low_learning_rate(world: dict[str, Path]) -> None:
    """A run on a lease stops when its wall-clock budget is spent, well before ``steps``, with a
    checkpoint and an adapter, and its schedule has decayed to the floor by then."""
    from adapters.adapter import load_adapter
    from adapters.training.trainer import lr_at

    cfg = _config(world, "budget", max_layer=1, ctc_weight=1.0, steps=100000, time_budget_s=3.0, log_every=1)
    t = Trainer(cfg)
    result = t.run()
    assert 1 <= result.steps < 100000
    records = [json.loads(line) for line in (t.work_dir / "train_log.jsonl").read_text().splitlines()]
    log = [r for r in records if "loss" in r]
    assert log[-1]["step"] == result.steps and log[-1]["elapsed_s"] >= 3.0
    # the learning curve ends with the held-out evaluation of the exported weights
    assert records[-1]["step"] == result.steps and "eval_loss" in records[-1] and records[-1] == result.eval
    assert sorted(t.work_dir.glob("ckpt-*.pt"))[-1].name == f"ckpt-{result.steps:07d}.pt"
    assert load_adapter(result.output).config.training["steps"] == result.steps
    # the schedule follows the clock when the budget runs out first
    assert lr_at(50, cfg, elapsed_s=3.0) == pytest.approx(cfg.lr * cfg.min_lr_ratio)
    assert lr_at(50, cfg, elapsed_s=1.5) == pytest.approx(cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5))
    # resuming a spent run trains nothing more
    again = Trainer(cfg)
    assert again.train() == result.steps


def test_export_latest_writes_the_checkpointed_adapter(world: dict[str, Path]) -> None:
    """`aura train --export-only`: a run still in progress can be exported (e.g. stage 1 for stage 2)."""
    from adapters.adapter import load_adapter

    kw = dict(max_layer=1, ctc_weight=1.0, steps=10, save_every=2)
    running = Trainer(_config(world, "export_latest", **kw))
    running.train(stop_after=4)
    exporter = Trainer(_config(world, "export_latest", **kw))
    out = exporter.export_latest()
    loaded = load_adapter(out)
    ckpt = torch.load(sorted(exporter.work_dir.glob("ckpt-*.pt"))[-1], weights_only=False)
    assert ckpt["step"] == 4 and loaded.config.training["stage"]["max_layer"] == 1
    torch.testing.assert_close(loaded.audio_layer.proj.weight.float(), running.student.audio_layer.proj.weight.detach().float())


def test_centered_targets_leave_no_position_signal() -> None:
    """Targets that are position + content: after centering, a predictor that knows only the
    position is at cosine distance ~1 (it was ~0 on the raw targets), while the content
    survives (centered targets still tell two clips apart)."""
    from adapters.training.losses import distill_loss
    from adapters.training.teacher import TargetStats

    torch.manual_seed(3)
    layers, width, positions = 2, 32, 20
    pos = 10.0 * torch.randn(layers, positions, width)  # a large position signal, as in Whisper's early blocks
    clips = [pos[:, :n] + torch.randn(layers, n, width) for n in (12, 20, 16, 20, 9, 18, 20, 14) * 8]
    stats = TargetStats.estimate(clips)
    centered = [stats.normalize(t) for t in clips]
    pooled = torch.cat(centered, dim=1)
    assert float(pooled.std()) == pytest.approx(1.0, abs=0.1)
    for target in clips[:4]:
        n = target.shape[1]
        mask = torch.ones(1, n, dtype=torch.bool)
        position_only = stats.mean[:, :n]
        raw = distill_loss(position_only[0][None], target[0][None], mask, "cosine")
        cen = distill_loss(stats.normalize(position_only)[0][None], stats.normalize(target)[0][None], mask, "cosine")
        assert float(raw) < 0.05 and float(cen) > 0.8
    longer = stats.normalize(pos[:, :5].repeat(1, 6, 1))  # past the longest sampled clip: the last mean
    assert longer.shape == (layers, 30, width)


def test_trainer_centers_teacher_targets_when_asked(world: dict[str, Path]) -> None:
    """The centering statistics exist only when asked for, and the distillation term really uses
    them: the same student on the same batch gives another loss with the raw targets."""
    raw = Trainer(_config(world, "raw_t", max_layer=1, tasks="transcribe"))
    cen = Trainer(_config(world, "cen_t", max_layer=1, tasks="transcribe", distill_targets="centered", distill_stats_clips=6))
    assert raw.target_stats == {} and list(cen.target_stats) == ["tokens"]
    assert cen.target_stats["tokens"].mean.shape[0] == 2  # one per distilled layer
    cen.student.eval()
    with torch.no_grad():
        centered = float(cen._losses([0, 1], cen.examples, {})["distill"])
        stats, cen.target_stats = cen.target_stats, {}
        uncentered = float(cen._losses([0, 1], cen.examples, {})["distill"])
    cen.target_stats = stats
    assert abs(centered - uncentered) > 1e-3


def test_answers_end_with_the_templates_end_of_turn_not_whatever_eos_is_called(world: dict[str, Path]) -> None:
    """A tokenizer converted with eos = <|im_start|> (seen from one GGUF conversion) must still train
    answers that end with <|im_end|>, the token the chat template closes a turn with and the one the
    server stops on; otherwise the adapter learns to open a new turn instead of stopping."""
    from transformers import AutoTokenizer

    from adapters.prompt import end_of_turn_id
    from adapters.training.data import build_example

    tok = AutoTokenizer.from_pretrained(str(world["student"]))
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_id(tok) == im_end
    tok.eos_token = "<|im_start|>"
    assert tok.eos_token_id != im_end and end_of_turn_id(tok) == im_end
    t = Trainer(_config(world, "eot", steps=1))
    e = build_example(0, t.setup.rows[0], world["manifest"].parent, tokenizer=tok, layout=t.setup.layout,
                      features=t.setup.features, audio_layer=t.student.audio_layer.config,
                      transcribe_prompt=t.config.transcribe_prompt, max_response_tokens=64)
    assert e.target_ids[-1] == im_end and t.end_of_turn == im_end


def test_text_kd_reads_the_transcript_with_the_base_llm_and_pulls_the_student_toward_it(world: dict[str, Path]) -> None:
    """text_kd: the reference is the LLM (LoRA off) on the same prompt with the transcript in place
    of the audio, at the same answer tokens; training on it alone lowers the held-out KL; a
    truncated stage refuses it."""
    from adapters.training.data import collate, with_features_batch

    cfg = _config(world, "text_kd", text_kd_weight=1.0, ce_weight=0.0, distill_loss="none", steps=25, lr=5e-3)
    t = Trainer(cfg)
    e = t.examples[0]
    text = t.tokenizer.decode(e.text_prompt_ids)
    row = t.setup.rows[0]
    assert row.text in text and t.setup.layout.audio_start + row.text + t.setup.layout.audio_end in text
    assert e.text_prompt_ids[-3:] == e.prompt_ids[-3:]  # same turn ending: the answer follows the same tokens
    # the reference logits are the plain base model's on [text prompt + answer], at the answer positions
    batch = collate(with_features_batch(t.examples[:2], t.setup.features), t.pad_id, text=True)
    ref = t._reading_logits(batch)
    with t.student.peft_model.disable_adapter(), torch.no_grad():
        alone = t.student.causal_lm(input_ids=torch.tensor([e.text_prompt_ids + e.target_ids])).logits[0]
    p = len(e.text_prompt_ids)
    torch.testing.assert_close(ref[: len(e.target_ids)], alone[p - 1 : p - 1 + len(e.target_ids)], rtol=1e-4, atol=1e-4)
    before = t.evaluate()
    t.train()
    after = t.evaluate()
    assert before is not None and after is not None
    assert after["eval_text_kd"] < 0.8 * before["eval_text_kd"], (before, after)
    with pytest.raises(ConfigError, match="text_kd"):
        Trainer(_config(world, "text_kd_trunc", text_kd_weight=1.0, max_layer=1, ctc_weight=1.0))


def test_spec_augment_masks_bands_and_spans_of_the_clip_only_and_reproducibly() -> None:
    """Masks cover whole mel bands and whole frame spans inside the clip (padding untouched, the
    input not mutated), no wider than configured; the same seed draws the same masks, another
    seed others."""
    from adapters.training.spec_augment import SpecAugment

    torch.manual_seed(0)
    feats = torch.randn(80, 500)
    n = 400
    aug = SpecAugment(time_masks=2, time_width=0.05, freq_masks=2, freq_width=10)
    before = feats.clone()
    outs = [aug(feats, n, seed) for seed in range(20)]
    torch.testing.assert_close(feats, before, rtol=0, atol=0)  # not mutated
    assert torch.equal(aug(feats, n, 7), outs[7]) and not torch.equal(outs[7], outs[8])
    masked_any = 0
    for out in outs:
        torch.testing.assert_close(out[:, n:], feats[:, n:], rtol=0, atol=0)
        changed = out[:, :n] != feats[:, :n]
        bands = changed.all(dim=1)  # mel bins masked over every frame
        spans = changed.all(dim=0)  # frames masked over every bin
        # every change belongs to a masked band or a masked span
        assert not (changed & ~bands[:, None] & ~spans[None, :]).any()
        assert int(bands.sum()) <= 2 * 10 and int(spans.sum()) <= 2 * int(0.05 * n)
        masked_any += int(changed.any())
    assert masked_any >= 18  # widths are drawn from 0..max, so a rare draw masks nothing
    assert SpecAugment()(feats, n, 1) is feats  # off by default: no copy, no change


def test_frequency_warp_moves_a_tone_to_the_warped_frequency_and_leaves_the_rest_alone() -> None:
    """A 1 kHz tone's log-mel peak, warped by 1.2, lands in the bin of 1.2 kHz (by 0.8, of 800 Hz);
    factor 1 is the identity; padding is untouched; the augmentation draws its factor per seed
    within [1 - w, 1 + w]."""
    import math

    from adapters.features import FeatureConfig, log_mel, mel_bin_position
    from adapters.training.spec_augment import SpecAugment, warp_frequencies

    cfg = FeatureConfig()
    t = torch.arange(cfg.sample_rate) / cfg.sample_rate
    feats, frames = log_mel([torch.sin(2 * math.pi * 1000.0 * t)], cfg)
    n = int(frames[0])
    tone = torch.cat([feats[0, :, :n], torch.full((cfg.n_mels, 7), -1.0)], dim=1)  # + 7 padding frames

    def peak(x: torch.Tensor) -> int:
        return int(x[:, :n].mean(dim=1).argmax())

    assert abs(peak(tone) - float(mel_bin_position(cfg, torch.tensor(1000.0)))) <= 1
    for factor in (1.2, 0.8):
        warped = warp_frequencies(tone, n, factor, cfg)
        assert abs(peak(warped) - float(mel_bin_position(cfg, torch.tensor(1000.0 * factor)))) <= 1
        assert peak(warped) != peak(tone)
        torch.testing.assert_close(warped[:, n:], tone[:, n:], rtol=0, atol=0)
    torch.testing.assert_close(warp_frequencies(tone, n, 1.0, cfg), tone, rtol=0, atol=1e-5)

    aug = SpecAugment(freq_warp=0.2, features=cfg)
    peaks = {peak(aug(tone, n, seed)) for seed in range(30)}
    lo, hi = (float(mel_bin_position(cfg, torch.tensor(f))) for f in (800.0, 1200.0))
    assert len(peaks) >= 4 and all(lo - 1 <= p <= hi + 1 for p in peaks)  # many factors, all within range
    assert torch.equal(aug(tone, n, 3), aug(tone, n, 3))


@pytest.mark.parametrize("kind", ["masks", "warp"])
def test_trainer_masks_training_batches_only_and_resumes_with_the_same_masks(world: dict[str, Path], kind: str) -> None:
    """SpecAugment on (masks, or the frequency warp alone): a training step's loss differs from the
    unaugmented one (the augmentation reaches the student), without a step (as evaluation calls it) the
    inputs are clean, and a run stopped and resumed equals a straight one, bit for bit (masks and
    warps are drawn per (seed, step, example), not from a global RNG)."""
    augment = (dict(spec_time_masks=2, spec_time_width=0.2, spec_freq_masks=2, spec_freq_width=20) if kind == "masks"
               else dict(spec_freq_warp=0.2))
    kw = dict(max_layer=1, ctc_weight=1.0, distill_weight=1.0, steps=4, save_every=2, **augment)
    t = Trainer(_config(world, f"spec_a_{kind}", **kw))
    idx = [0, 1, 2, 3]
    with torch.no_grad():
        clean = float(t._losses(idx, t.examples, {})["loss"])
        masked = [float(t._losses(idx, t.examples, {}, step=s)["loss"]) for s in (0, 1)]
        again = float(t._losses(idx, t.examples, {}, step=1)["loss"])
    assert masked[0] != clean and masked[1] != masked[0] and again == masked[1]
    t.train()
    second = _interrupted_run(world, f"spec_b_{kind}", stop_after=2, **kw)
    _assert_same_weights(t, second)


def test_evaluation_reports_the_next_token_loss_per_task(world: dict[str, Path]) -> None:
    """eval_ce_transcribe / eval_ce_qa: each the loss of its own rows (recomputed here row by row
    within tolerance), and eval_ce their mean weighted by row counts."""
    t = Trainer(_config(world, "eval_tasks", distill_loss="none", batch_size=1))
    result = t.evaluate()
    assert result is not None
    counts = {task: sum(1 for e in t.eval_examples if e.task == task) for task in ("transcribe", "qa")}
    assert min(counts.values()) > 0
    for task in counts:
        with torch.no_grad():
            own = [float(t._losses([i], t.eval_examples, {})["ce"]) for i, e in enumerate(t.eval_examples) if e.task == task]
        assert result[f"eval_ce_{task}"] == pytest.approx(sum(own) / len(own), rel=1e-4)
    mixed = sum(result[f"eval_ce_{task}"] * c for task, c in counts.items()) / sum(counts.values())
    assert result["eval_ce"] == pytest.approx(mixed, rel=1e-4)
    assert result["eval_ce_transcribe"] != pytest.approx(result["eval_ce_qa"], rel=1e-3)


def test_a_checkpoint_resumes_from_another_folder_but_never_on_other_data(world: dict[str, Path], tmp_path: Path) -> None:
    """A later GPU lease unpacks the same models and corpus under other paths: its checkpoint must
    resume there (the run's fingerprint is the content, not the paths), and must refuse a
    manifest whose rows differ."""
    import shutil

    kw = dict(max_layer=1, ctc_weight=1.0, distill_loss="none", steps=4, save_every=2)
    first = Trainer(_config(world, "moved_a", **kw))
    assert first.train(stop_after=2) == 2
    moved = tmp_path / "elsewhere"
    shutil.copytree(world["student"], moved / "student")
    shutil.copytree(world["teacher"], moved / "teacher")
    manifest = world["manifest"].parent / "moved_manifest.jsonl"  # audio paths are relative to the manifest's folder
    manifest.write_text(world["manifest"].read_text())
    work = first.work_dir
    again = Trainer(_config(world, "moved_b", work_dir=work, student=moved / "student", teacher=moved / "teacher",
                            manifest=manifest, **kw))
    assert again.train() == 4
    rows = manifest.read_text().splitlines()
    manifest.write_text("\n".join(rows[1:] + rows[:1]) + "\n")  # same rows, another order: other batches
    with pytest.raises(ConfigError, match="different settings"):
        Trainer(_config(world, "moved_c", work_dir=work, student=moved / "student", teacher=moved / "teacher",
                        manifest=manifest, **kw)).train()


def test_step_time_bench_times_real_steps_and_names_the_operators(world: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """``bench/step_time.py`` runs the trainer's own steps of a configuration given as ``aura train`` flags and
    reports seconds per step and the operators by self time (the LM-head CTC's matmul among them here)."""
    from bench.step_time import main

    flags = ["--student", str(world["student"]), "--teacher", str(world["teacher"]), "--manifest", str(world["manifest"]),
             "--teacher-cache", str(world["root"] / "tcache"), "--max-layer", "1", "--ctc-weight", "1.0",
             "--layer-map", "0:0,1:1", "--lora-rank", "4", "--batch-size", "2", "--threads", "1"]
    assert main([*flags, "--warmup", "1", "--timed", "2", "--profiled", "1", "--top", "40"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["s_per_step"] > 0 and out["batch_size"] == 2 and out["max_layer"] == 1 and "cores" in out["machine"]
    width = json.loads((Path(world["student"]) / "config.json").read_text())["vocab_size"]  # the LM head's
    assert any(o["op"] == "aten::mm" and str(width) in o["shapes"] for o in out["top_ops"])
    assert 0 < sum(o["share"] for o in out["top_ops"]) <= 1.0 + 1e-6
    with pytest.raises(SystemExit):
        main([*flags, "--timed", "0"])
