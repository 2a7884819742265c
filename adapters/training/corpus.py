"""The open-vocabulary spoken corpus: LLM-written lines, many espeak-ng voices, a share of neural
(Piper) and classic (flite, Festival) voices, augmentation, and a held-out split that shares no word
4-gram and no voice with training.

Stages, each cached under ``out_dir`` so an interrupted build continues where it stopped:

1. ``texts_raw.jsonl``: the base LLM's generations (:mod:`adapters.training.texts`).
2. split: held-out lines are chosen first; every training line sharing a word 4-gram with one is
   dropped. The check is re-run on the final manifests and written to ``stats.json``.
3. audio: each row's voice, speed, pitch and augmentation chain come from a per-row seeded RNG,
   so a clip is a pure function of (seed, split, index); existing clips are kept. With
   ``neural_share`` > 0, that share of the training rows (drawn from a stream of its own, so the
   other rows keep their voices and clips) is spoken by an installed Piper voice instead; with
   ``system_share`` > 0, that share of the rest by a training flite/Festival voice. Held-out rows are
   never Piper (too few voices to keep one back); with ``heldout_voices="system"`` they are spoken by
   the flite/Festival voices of held-out-only speakers, like the issue's own held-out set (other
   synthetic voices than espeak-ng), instead of held-out espeak-ng variants.
4. manifests: ``train.jsonl`` (every clip as ``transcribe``; question clips also as ``qa`` on the
   same audio) and ``heldout.jsonl`` (half qa, half transcribe; a third of the clips noisy).

qa rows get their ``response`` from ``aura data responses`` (the base LLM's own answer).
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np
from tqdm import tqdm

from adapters.training.data import read_manifest
from adapters.training.augment import add_noise, augment, babble_noise, pink_noise, snr_db, white_noise
from adapters.training.texts import (
    TextLine, drop_overlapping, generate_lines, interleave, markov_lines, overlapping, split_heldout, text_stats, words,
)
from adapters.training.neural_voices import LENGTH_SCALE_RANGE, NeuralVoice, PiperProcess, installed_piper_voices
from adapters.training.system_voices import (
    STRETCH_RANGE,
    SystemVoice,
    draw_system_voice,
    speak_system,
    split_system_voices,
)
from adapters.training.voices import Voice, english_accents, sample_voice, speak, split_variants, write_wav

SAMPLE_RATE = 16000
BABBLE_CLIPS = 24
HeldoutVoices = Literal["espeak", "system"]  # held-out rows in held-out espeak-ng variants / held-out flite+Festival speakers
HELDOUT_VOICES: tuple[str, ...] = get_args(HeldoutVoices)
AnyVoice = Voice | NeuralVoice | SystemVoice


@dataclass
class CorpusOptions:
    out_dir: Path
    model: Path | None  # the LLM that writes the lines (None: texts_raw.jsonl must be complete)
    n_train: int = 10_000  # distinct training lines (clips)
    n_heldout: int = 90
    seed: int = 0
    augment_prob: float = 0.7
    workers: int = 2
    progress: bool = True
    gen_batch_size: int = 256
    llm_prompts: int = 6000  # LLM generations (everyday questions/statements); about 45% survive cleaning
    heldout_from: Path | None = None  # reuse this held-out manifest's lines (and so its clips): comparable numbers across corpus versions
    neural_share: float = 0.0  # share of training rows spoken by an installed Piper voice (0 = espeak-ng only)
    system_share: float = 0.0  # share of the other training rows spoken by a training flite/Festival voice
    heldout_voices: HeldoutVoices = "espeak"


def _rng(seed: int, split: str, i: int) -> random.Random:
    return random.Random(f"{seed}:{split}:{i}")


def _row_voice(seed: int, split: str, i: int, pool: list[str]) -> Voice:
    return sample_voice(_rng(seed, split + "/voice", i), english_accents(), pool)


def _neural_voice(seed: int, i: int, share: float, models: list[str]) -> NeuralVoice | None:
    """Training row ``i``'s neural voice, or None for espeak-ng. The choice has its own random
    stream, so adding neural voices leaves every other row's voice (and cached clip) as it was."""
    if share <= 0 or not models or _rng(seed, "train/engine", i).random() >= share:
        return None
    rng = _rng(seed, "train/neural", i)
    return NeuralVoice(rng.choice(models), round(rng.uniform(*LENGTH_SCALE_RANGE), 3))


def _system_voice(seed: int, split: str, i: int, share: float, pool: list[tuple[str, str]]) -> SystemVoice | None:
    """Row ``i``'s flite/Festival voice, or None. Its own random stream, as for ``_neural_voice``."""
    if share <= 0 or not pool or _rng(seed, split + "/engine-system", i).random() >= share:
        return None
    rng = _rng(seed, split + "/system", i)
    engine, name = draw_system_voice(rng, pool)
    return SystemVoice(engine, name, round(rng.uniform(*STRETCH_RANGE), 3))


def _babble_pool(lines: list[TextLine], pool: list[str], seed: int, split: str) -> list[np.ndarray]:
    """Clean speech of a few lines of the same split, to sum into babble noise."""
    return [speak(t.text, _row_voice(seed, split + "/babble", i, pool), sample_rate=SAMPLE_RATE)
            for i, t in enumerate(lines[:BABBLE_CLIPS])]


def render_clip(text: str, voice: AnyVoice, path: Path, rng: random.Random, *, others: list[np.ndarray],
                augment_prob: float, noisy: bool, piper: PiperProcess | None = None) -> dict[str, float | str]:
    """Speak, optionally augment (train) or add noise (noisy held-out), write 16 kHz PCM."""
    if isinstance(voice, NeuralVoice):
        if piper is None:
            raise ValueError(f"{voice.name} needs a running Piper (PiperProcess)")
        x = piper.speak(text, voice, sample_rate=SAMPLE_RATE)
    elif isinstance(voice, SystemVoice):
        x = speak_system(text, voice, sample_rate=SAMPLE_RATE)
    else:
        x = speak(text, voice, sample_rate=SAMPLE_RATE)
    info: dict[str, float | str] = {}
    if noisy:
        nrng = np.random.default_rng(rng.getrandbits(63))
        kind = rng.choice(["white", "pink", "babble"])
        snr = round(rng.uniform(5.0, 20.0), 2)
        noise = {"white": white_noise, "pink": pink_noise}.get(kind)
        n = noise(len(x), nrng) if noise else babble_noise(len(x), nrng, others)
        y = add_noise(x, n, snr)
        info = {"noise": kind, "snr_db": snr, "measured_snr_db": round(snr_db(x, y), 2)}
        x = y
    elif rng.random() < augment_prob:
        x, info = augment(x, rng, sample_rate=SAMPLE_RATE, others=others)
    peak = float(np.max(np.abs(x))) if len(x) else 0.0
    if peak > 1.0:
        x = x / peak
    write_wav(path, x, SAMPLE_RATE)
    info["duration_s"] = round(len(x) / SAMPLE_RATE, 3)
    return info


def heldout_lines(manifest: Path) -> list[TextLine]:
    """The lines of an earlier build's held-out manifest, in clip order (``heldout-000042.wav`` is
    line 42), so a build that reuses them renders the very same held-out clips."""
    listed = read_manifest(manifest, check_audio=False)
    rows = {int(Path(r.audio).stem.rsplit("-", 1)[1]): r for r in listed}
    if len(rows) != len(listed) or sorted(rows) != list(range(len(rows))):
        raise ValueError(f"{manifest}: not a held-out manifest written by this builder (clips are not heldout-000000..)")
    return [TextLine(text=rows[i].text, task=rows[i].task, kind=str(getattr(rows[i], "kind", "")),
                     seed_word=str(getattr(rows[i], "seed_word", ""))) for i in range(len(rows))]


def _clip_key(opts: CorpusOptions, split: str, i: int, text: str, voice: AnyVoice, noisy: bool) -> str:
    """What a clip was rendered from. A resumed build reuses a clip only when its key matches, so a
    rebuild with another ``n_train`` (which reorders the lines) or seed re-renders instead of
    pairing old audio with new text. The babble pool is a function of the same inputs."""
    what = [opts.seed, opts.n_train, opts.n_heldout, opts.augment_prob, split, i, text, repr(voice), noisy]
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]


def build_corpus(opts: CorpusOptions, *, log: Callable[[str], None] | None = None) -> dict[str, Path]:
    """Write ``train.jsonl``, ``heldout.jsonl``, ``stats.json`` and ``audio/`` under ``opts.out_dir``."""
    say = log or (lambda m: print(m, file=sys.stderr, flush=True))
    out = Path(opts.out_dir)
    (out / "audio").mkdir(parents=True, exist_ok=True)
    raw = out / "texts_raw.jsonl"
    if opts.model is None and not raw.is_file():
        raise FileNotFoundError(f"{raw} does not exist and no model was given to write the lines")
    llm = generate_lines(opts.model or Path("."), opts.llm_prompts, seed=opts.seed, cache=raw,
                         batch_size=opts.gen_batch_size, progress=opts.progress) if opts.llm_prompts else []
    say(f"corpus: {len(llm)} distinct usable LLM lines from {opts.llm_prompts} generations")
    # held-out lines are everyday LLM lines only (what a user says), never encyclopedia text
    if opts.heldout_from is not None:
        held_lines = heldout_lines(Path(opts.heldout_from))
        held_texts = {t.text for t in held_lines}
        llm_train = drop_overlapping([t for t in llm if t.text not in held_texts], held_lines)
    else:
        llm_train, held_lines = split_heldout(llm, opts.n_heldout, seed=opts.seed)
    n_wiki = max(0, opts.n_train - len(llm_train))
    wiki = markov_lines(n_wiki + n_wiki // 20 + 50, opts.seed, exclude=[t.text for t in llm]) if n_wiki else []
    wiki = drop_overlapping(wiki, held_lines)[:n_wiki]
    train_lines = interleave(llm_train, wiki)[: opts.n_train]
    if len(train_lines) < opts.n_train:
        say(f"corpus: only {len(train_lines)} training lines (wanted {opts.n_train}); raise overgenerate for more")
    train_pool, held_pool = split_variants(seed=opts.seed)

    babble = {"train": _babble_pool(train_lines, train_pool, opts.seed, "train"),
              "heldout": _babble_pool(held_lines, held_pool, opts.seed, "heldout")}
    neural = installed_piper_voices() if opts.neural_share > 0 else {}
    if opts.neural_share > 0 and not neural:
        raise RuntimeError("neural_share > 0 but no Piper voice is installed (pip install -e '.[tts]')")
    if opts.heldout_voices not in HELDOUT_VOICES:
        raise ValueError(f"heldout_voices={opts.heldout_voices!r}: use one of {', '.join(HELDOUT_VOICES)}")
    system_share = {"train": opts.system_share, "heldout": 1.0 if opts.heldout_voices == "system" else 0.0}
    # the installed voices are looked up only when some row may use one, as for Piper above
    system = (dict(zip(("train", "heldout"), split_system_voices(), strict=True)) if any(v > 0 for v in system_share.values())
              else {"train": [], "heldout": []})
    for split in ("train", "heldout"):
        if system_share[split] > 0 and not system[split]:
            raise RuntimeError(f"no {split} flite/Festival voice is installed (make install; apt-get install flite festival "
                               "festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts)")
    jobs: list[tuple[str, int, TextLine, AnyVoice, bool]] = []
    for split, group, pool in (("train", train_lines, train_pool), ("heldout", held_lines, held_pool)):
        for i, t in enumerate(group):
            noisy = split == "heldout" and i % 3 == 0  # a third, spread over qa and transcribe lines
            voice: AnyVoice | None = _neural_voice(opts.seed, i, opts.neural_share, list(neural)) if split == "train" else None
            voice = voice or _system_voice(opts.seed, split, i, system_share[split], system[split])
            jobs.append((split, i, t, voice or _row_voice(opts.seed, split, i, pool), noisy))

    infos: dict[tuple[str, int], dict[str, float | str]] = {}
    keys: dict[tuple[str, int], str] = {}
    meta_file = out / "audio_meta.jsonl"
    if meta_file.is_file():
        for line in meta_file.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            infos[(rec["split"], rec["i"])] = rec["info"]
            keys[(rec["split"], rec["i"])] = rec.get("key", "")

    todo = []  # (job, its clip key) for each clip that is missing or was rendered from something else
    for job in jobs:
        key = _clip_key(opts, job[0], job[1], job[2].text, job[3], job[4])
        if not ((out / "audio" / f"{job[0]}-{job[1]:06d}.wav").is_file() and keys.get((job[0], job[1])) == key):
            todo.append((job, key))
    n_neural = sum(isinstance(job[3], NeuralVoice) for job, _ in todo)
    piper = PiperProcess(neural) if n_neural else None

    def work(item: tuple[tuple[str, int, TextLine, AnyVoice, bool], str]) -> tuple[str, int, str, dict[str, float | str]]:
        (split, i, t, voice, noisy), key = item
        info = render_clip(t.text, voice, out / "audio" / f"{split}-{i:06d}.wav", _rng(opts.seed, split, i), others=babble[split],
                           augment_prob=opts.augment_prob if split == "train" else 0.0, noisy=noisy, piper=piper)
        return split, i, key, info

    if todo:
        say(f"corpus: rendering {len(todo)} of {len(jobs)} clips ({n_neural} neural)")
    try:
        _render_all(todo, work, infos, meta_file, opts.workers, opts.progress)
    finally:
        if piper is not None:
            piper.close()

    paths: dict[str, Path] = {}
    rows: dict[str, list[dict[str, object]]] = {"train": [], "heldout": []}
    for split, i, t, voice, noisy in jobs:
        base = {"audio": f"audio/{split}-{i:06d}.wav", "text": t.text, "voice": voice.name, "speed": voice.speed,
                "pitch": voice.pitch, "kind": t.kind, "split": split, "aug": infos[(split, i)]}
        if split == "train":
            rows[split].append({**base, "task": "transcribe"})
            if t.task == "qa":
                rows[split].append({**base, "task": "qa"})
        else:
            rows[split].append({**base, "task": t.task, "noisy": noisy})
    rng = random.Random(opts.seed)
    for split in ("train", "heldout"):
        rng.shuffle(rows[split])
        p = out / f"{split}.jsonl"
        old = [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.is_file() else []
        existing = {r["audio"] + r["task"]: r.get("response") for r in old}
        for r in rows[split]:  # keep responses already filled by an earlier build
            resp = existing.get(str(r["audio"]) + str(r["task"]))
            if resp is not None:
                r["response"] = resp
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows[split]))
        tmp.replace(p)
        paths[split] = p
    stats = corpus_stats(out, train_lines, held_lines, train_pool, held_pool, jobs, infos)
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    say("corpus: " + json.dumps(stats))
    paths["stats"] = out / "stats.json"
    return paths


def _render_all(todo: list[tuple[tuple[str, int, TextLine, AnyVoice, bool], str]],
                work: Callable[[tuple[tuple[str, int, TextLine, AnyVoice, bool], str]], tuple[str, int, str, dict[str, float | str]]],
                infos: dict[tuple[str, int], dict[str, float | str]], meta_file: Path, workers: int, progress: bool) -> None:
    """Render ``todo`` on ``workers`` threads; each finished clip is appended to ``meta_file`` at once,
    so a killed build resumes after the last clip it wrote."""
    with ThreadPoolExecutor(workers) as pool, open(meta_file, "a") as meta:
        for split, i, key, info in tqdm(pool.map(work, todo), total=len(todo), desc="speech", file=sys.stderr,
                                        disable=not progress, mininterval=5):
            infos[(split, i)] = info
            meta.write(json.dumps({"split": split, "i": i, "key": key, "info": info}) + "\n")
            meta.flush()


def corpus_stats(out: Path, train: list[TextLine], held: list[TextLine], train_pool: list[str], held_pool: list[str],
                 jobs: list[tuple[str, int, TextLine, AnyVoice, bool]],
                 infos: dict[tuple[str, int], dict[str, float | str]]) -> dict[str, object]:
    """What the issue asks to report, computed from what was written (the 4-gram check re-run)."""
    tr_vocab = {w for t in train for w in words(t.text)}
    voices = {s: {v.name for s_, _, _, v, _ in jobs if s_ == s} for s in ("train", "heldout")}
    neural = {s: [v for s_, _, _, v, _ in jobs if s_ == s and isinstance(v, NeuralVoice)] for s in ("train", "heldout")}
    system = {s: [v for s_, _, _, v, _ in jobs if s_ == s and isinstance(v, SystemVoice)] for s in ("train", "heldout")}
    speakers = {s: {v.speaker for v in vs} for s, vs in system.items()}
    secs = {s: sum(float(infos[(s_, i)].get("duration_s", 0.0)) for s_, i, _, _, _ in jobs if s_ == s) for s in ("train", "heldout")}
    return {
        "train": text_stats(train), "heldout": text_stats(held),
        "train_distinct_words": len(tr_vocab),
        "heldout_4gram_overlap_lines": len(overlapping([t.text for t in held], [t.text for t in train], 4)),
        "heldout_lines_in_train": len({t.text for t in held} & {t.text for t in train}),
        "voice_variants": {"train": len(train_pool), "heldout": len(held_pool), "heldout_names": held_pool},
        "voices_used": {"train": len(voices["train"]), "heldout": len(voices["heldout"]),
                        "shared": len(voices["train"] & voices["heldout"])},
        "accents": list(english_accents()),
        "hours": {s: round(v / 3600, 3) for s, v in secs.items()},
        "heldout_noisy": sum(1 for s, _, _, _, n in jobs if s == "heldout" and n),
        "augmented_train_clips": sum(1 for (s, _), inf in infos.items() if s == "train" and len(inf) > 1),
        "neural_voices": {s: sorted({v.name for v in vs}) for s, vs in neural.items()},
        "neural_clips": {s: len(vs) for s, vs in neural.items()},
        "system_voices": {s: sorted({v.name for v in vs}) for s, vs in system.items()},
        "system_clips": {s: len(vs) for s, vs in system.items()},
        "system_speakers": {s: {sex: sorted({v.speaker for v in vs if v.sex == sex}) for sex in ("f", "m")}
                            for s, vs in system.items()},
        "system_speakers_shared": len(speakers["train"] & speakers["heldout"]),
        "system_clips_by_sex": {s: {sex: sum(v.sex == sex for v in vs) for sex in ("f", "m")} for s, vs in system.items()},
    }
