"""A spoken demo corpus made with espeak-ng: questions a 135M model answers well, and sentences.

Speech comes from many espeak-ng voices and variants at several speeds and pitches. The held-out
split uses sentences/questions that never occur in training *and* voices that never occur in
training, so its numbers measure generalisation, not memorisation. Clips are short (2-4 s) to
keep CPU training cheap.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

TRAIN_VOICES = [
    "en-us", "en-us+f2", "en-us+m3", "en-us+f4", "en-gb", "en-gb+f3", "en-gb+m2", "en-gb-scotland",
    "en-gb-scotland+f1", "en-029", "en-029+m4", "en-gb-x-rp", "en-gb-x-rp+f5", "en-gb-x-gbclan+m1",
    "en-gb-x-gbcwmd", "en-us-nyc+f1",
]
HELDOUT_VOICES = ["en-us+m5", "en-gb+f4", "en-029+f2", "en-gb-scotland+m6", "en-gb-x-rp+m7", "en-us-nyc+m2"]

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "England": "London", "Russia": "Moscow", "China": "Beijing", "Egypt": "Cairo", "Greece": "Athens",
    "Portugal": "Lisbon", "Ireland": "Dublin", "Canada": "Ottawa", "Austria": "Vienna", "Norway": "Oslo",
    "Sweden": "Stockholm", "Poland": "Warsaw", "Mexico": "Mexico City", "Kenya": "Nairobi", "Peru": "Lima",
    "Thailand": "Bangkok", "Cuba": "Havana", "Finland": "Helsinki", "Denmark": "Copenhagen",
    "Belgium": "Brussels", "Hungary": "Budapest", "Argentina": "Buenos Aires", "India": "New Delhi",
}
COLORS = {
    "the sky": "blue", "grass": "green", "a banana": "yellow", "snow": "white", "a strawberry": "red",
    "an orange": "orange", "coal": "black", "a lemon": "yellow", "the sun": "yellow", "milk": "white",
    "a tomato": "red", "a carrot": "orange", "a frog": "green", "the ocean": "blue", "chocolate": "brown",
    "a cherry": "red", "a leaf": "green", "a pumpkin": "orange", "an elephant": "gray", "a crow": "black",
}
COUNTS = [
    ("How many legs does a dog have?", "four"), ("How many days are in a week?", "seven"),
    ("How many legs does a spider have?", "eight"), ("How many months are in a year?", "twelve"),
    ("How many wheels does a bicycle have?", "two"), ("How many sides does a triangle have?", "three"),
    ("How many hours are in a day?", "twenty four"), ("How many legs does a bird have?", "two"),
    ("How many sides does a square have?", "four"), ("How many minutes are in an hour?", "sixty"),
    ("How many fingers are on one hand?", "five"), ("How many wheels does a car have?", "four"),
]
NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
FACTS = [
    "What is the largest planet in our solar system?", "What is the opposite of hot?",
    "What is the opposite of up?", "What do bees make?", "What do cows drink?", "What animal says meow?",
    "What animal barks?", "What is frozen water called?", "What is the tallest animal?",
    "Which planet do we live on?", "What gas do plants breathe in?", "What is the largest ocean?",
    "What is the opposite of day?", "What do you call a baby cat?", "What do you call a baby dog?",
    "Who wrote Romeo and Juliet?", "What is the boiling point of water in Celsius?",
    "What is the chemical symbol for water?", "What language is spoken in Brazil?", "What is the fastest land animal?",
]
CAPITAL_TEMPLATES = ["What is the capital of {x}?", "Which city is the capital of {x}?", "Tell me the capital of {x}.",
                     "What city is the capital of {x}?"]
COLOR_TEMPLATES = ["What color is {x}?", "What is the color of {x}?", "Tell me what color {x} is."]
ARITH_TEMPLATES = ["What is {a} plus {b}?", "What is {a} times {b}?", "What number comes after {a}?"]

SUBJECTS = ["The little dog", "My old friend", "A tall woman", "The young teacher", "Our neighbor", "The farmer",
            "A small child", "The doctor", "My brother", "The pilot", "A quiet student", "The baker", "Her sister",
            "The old man", "A busy nurse", "The singer"]
VERBS = ["walked to", "looked at", "painted", "cleaned", "found", "visited", "opened", "closed", "carried",
         "bought", "sold", "watched", "fixed", "left", "reached", "passed"]
OBJECTS = ["the red house", "a green door", "the big window", "the wooden table", "a blue car", "the train station",
           "the river bank", "a new bicycle", "the kitchen", "the garden", "an empty box", "the library",
           "a white boat", "the market", "the long bridge", "a warm coat"]
TIMES = ["this morning", "last night", "after lunch", "on Sunday", "before dinner", "in the rain", "at noon",
         "yesterday", "every day", "in the summer", ""]


def question_pool() -> tuple[list[str], list[str]]:
    """(train, held-out) questions; held-out ones use countries/objects/sums never asked in training."""
    rng = random.Random(1234)
    held_countries = {"Portugal", "Kenya", "Finland", "Argentina"}
    held_objects = {"a tomato", "a frog", "chocolate"}
    train, held = [], []
    for country in CAPITALS:
        for i, t in enumerate(CAPITAL_TEMPLATES):
            (held if country in held_countries else train).append(t.format(x=country))
    for obj in COLORS:
        for t in COLOR_TEMPLATES:
            (held if obj in held_objects else train).append(t.format(x=obj))
    for i, (q, _) in enumerate(COUNTS):
        (held if i in (3, 9) else train).append(q)
    for i, q in enumerate(FACTS):
        (held if i in (2, 7, 13, 18) else train).append(q)
    for a in NUMBERS[:9]:
        for b in NUMBERS[:5]:
            for ti, t in enumerate(ARITH_TEMPLATES):
                if ti == 2 and b != "one":
                    continue
                q = t.format(a=a, b=b)
                (held if (a, b) in {("three", "four"), ("six", "two"), ("seven", "three"), ("eight", "one")} else train).append(q)
    rng.shuffle(train)
    rng.shuffle(held)
    return train, held


def sentence_pool(n_train: int, n_held: int, seed: int = 7) -> tuple[list[str], list[str]]:
    """Distinct random sentences; held-out ones are combinations never used in training."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < n_train + n_held:
        time_ = rng.choice(TIMES)
        s = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}" + (f" {time_}" if time_ else "") + "."
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out[:n_train], out[n_train:]


def _speak(text: str, path: Path, voice: str, speed: int, pitch: int) -> None:
    wav = path.with_suffix(".tmp.wav")
    subprocess.run([shutil.which("espeak-ng") or "espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(wav), text],
                   check=True, capture_output=True, timeout=60)
    # 16 kHz mono up front: every later reader (teacher, student, eval) decodes it as is
    subprocess.run([shutil.which("ffmpeg") or "ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i", str(wav),
                    "-ar", "16000", "-ac", "1", str(path)], check=True, capture_output=True, timeout=60)
    wav.unlink(missing_ok=True)


def make_demo_data(out_dir: Path, *, n_train: int = 1200, n_heldout: int = 80, qa_fraction: float = 0.5,
                   seed: int = 0, workers: int = 2, progress: bool = True) -> dict[str, Path]:
    """Write ``train.jsonl`` and ``heldout.jsonl`` (+ wavs) under ``out_dir``; returns their paths."""
    if shutil.which("espeak-ng") is None:
        raise FileNotFoundError("espeak-ng is not installed (apt-get install espeak-ng)")
    rng = random.Random(seed)
    out_dir = Path(out_dir)
    (out_dir / "audio").mkdir(parents=True, exist_ok=True)
    q_train, q_held = question_pool()
    n_qa_train, n_qa_held = int(n_train * qa_fraction), int(n_heldout * qa_fraction)
    s_train, s_held = sentence_pool(n_train - n_qa_train, n_heldout - n_qa_held, seed=seed + 7)

    jobs: list[tuple[str, dict]] = []
    for split, voices, qs, ss, n_qa in (("train", TRAIN_VOICES, q_train, s_train, n_qa_train),
                                        ("heldout", HELDOUT_VOICES, q_held, s_held, n_qa_held)):
        texts = [("qa", qs[i % len(qs)]) for i in range(n_qa)] + [("transcribe", s) for s in ss]
        for i, (task, text) in enumerate(texts):
            voice = rng.choice(voices)
            speed = rng.choice([140, 155, 165, 175, 190])
            pitch = rng.choice([35, 45, 50, 60, 70])
            name = f"{split}-{i:05d}.wav"
            jobs.append((split, {"audio": f"audio/{name}", "task": task, "text": text, "voice": voice,
                                 "speed": speed, "pitch": pitch}))

    def work(job: tuple[str, dict]) -> None:
        row = job[1]
        target = out_dir / row["audio"]
        if not target.exists():
            _speak(row["text"], target, row["voice"], row["speed"], row["pitch"])

    with ThreadPoolExecutor(workers) as pool:
        list(tqdm(pool.map(work, jobs), total=len(jobs), desc="espeak-ng", file=sys.stderr, disable=not progress))
    paths = {}
    for split in ("train", "heldout"):
        p = out_dir / f"{split}.jsonl"
        rows = [r for s, r in jobs if s == split]
        rng.shuffle(rows)
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths[split] = p
    return paths
