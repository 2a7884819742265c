"""Open-vocabulary sentences and questions for the spoken corpus, and the held-out text checks.

The old demo corpus filled a few templates from a closed vocabulary, so an adapter could score
well by emitting template sentences. Here the base LLM itself writes each line from a prompt
seeded with a random topic word (wonderwords' ~6,800 nouns, ~900 adjectives, ~1,000 verbs: a
word list that ships inside a PyPI package) and one of several kinds (everyday question, fact
question, statement, request, numbers, people, places). Every prompt carries its own sampling
seed, so the same ``seed`` writes the same lines; the lines are cached as JSONL, so a rebuild
never needs vLLM again.

Text is normalised for speech: digits are spelled out (espeak-ng reads "1984" as "nineteen
eighty four" but the reference would say "1984"), and anything a TTS reads unpredictably
(symbols, abbreviations in capitals, URLs) is rejected.
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

# (kind, task, prompt template). {noun}/{adj}/{verb}/{number} come from the seed words.
KINDS: list[tuple[str, str, str]] = [
    ("question", "qa", "Write one short question that someone might ask a friend about {noun}. Reply with the question only."),
    ("fact", "qa", "Write one short general knowledge question about {noun}. Reply with the question only."),
    ("howto", "qa", "Write one short question that starts with 'How do I' or 'Why does' and is about {noun}. Reply with the question only."),
    ("statement", "transcribe", "Write one short everyday sentence about a {adj} {noun}. Reply with the sentence only."),
    ("action", "transcribe", "Write one short sentence in which someone will {verb} something. Reply with the sentence only."),
    ("request", "transcribe", "Write one short polite request that someone might say to a voice assistant about {noun}. Reply with the request only."),
    ("number", "transcribe", "Write one short sentence about {noun} that uses the number {number}. Reply with the sentence only."),
    ("person", "transcribe", "Write one short sentence about a person with a first name, and {noun}. Reply with the sentence only."),
    ("place", "transcribe", "Write one short sentence about a trip to a city or a country, mentioning {noun}. Reply with the sentence only."),
    ("time", "transcribe", "Write one short sentence about a {adj} day that mentions a time or a date. Reply with the sentence only."),
]

_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
         "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_words(n: int) -> str:
    """0..999,999 in words, as a TTS reads them ("one hundred and five" without "and")."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    if n < 1000:
        return _ONES[n // 100] + " hundred" + ("" if n % 100 == 0 else " " + number_words(n % 100))
    if n < 1_000_000:
        return number_words(n // 1000) + " thousand" + ("" if n % 1000 == 0 else " " + number_words(n % 1000))
    raise ValueError(f"{n} is too large to spell")


def _year_words(n: int) -> str:
    """Years as spoken: 1984 -> nineteen eighty four, 2005 -> two thousand five."""
    if 1100 <= n <= 1999 and n % 100 != 0:
        return number_words(n // 100) + " " + (number_words(n % 100) if n % 100 >= 10 else "oh " + number_words(n % 100))
    return number_words(n)


def spell_numbers(text: str) -> str | None:
    """Digits -> words (years read as years); None if a number cannot be read unambiguously."""
    def one(m: re.Match[str]) -> str:
        raw = m.group(0).replace(",", "")
        n = int(raw)
        return _year_words(n) if len(raw) == 4 and 1100 <= n <= 2099 else number_words(n)

    if re.search(r"\d[.:/]\d|\d(st|nd|rd|th)\b|%|\$", text):
        return None  # decimals, times, dates, ordinals, money: read differently by different voices
    try:
        return re.sub(r"\d{1,3}(,\d{3})+|\d+", one, text)
    except ValueError:
        return None


_PREFIX = re.compile(r"^(question|sentence|request|answer|here is[^:]*|sure[^:]*)\s*:\s*", re.I)
_ALLOWED = re.compile(r"^[A-Za-z][A-Za-z ,.'?!\-]*[.?!]$")
# chat-model boilerplate, not everyday speech
_META = re.compile(r"^(i'm sorry|i'm here|i am here|i'm an ai|as an ai|imagine|sure|certainly|here's|here is)|"
                   r"voice assistant|\bsentence\b|\bquestion\b", re.I)
_SENTENCE_END = re.compile(r"(?<=[.?!])\s+(?=[A-Z])")


def clean_line(raw: str, *, min_words: int = 4, max_words: int = 20) -> str | None:
    """The first usable sentence of a generation, or None: speakable characters only, 4-20 words.

    Quotes and markdown are dropped (they are not heard), dashes and colons become commas,
    accents are folded; a long reply contributes its first sentence.
    """
    for line in raw.strip().splitlines():
        line = _PREFIX.sub("", line.strip().strip("*").strip())
        line = unicodedata.normalize("NFKD", line).encode("ascii", "ignore").decode() if not line.isascii() else line
        line = re.sub(r'["*_]|\u201c|\u201d', "", line.replace("\u2019", "'"))
        line = re.sub(r"\s*(--|:|;|\u2013|\u2014)\s*", ", ", line).strip().strip("'").strip()
        if not line:
            continue
        line = _SENTENCE_END.split(line)[0]
        line = spell_numbers(line)
        if line is None or _META.search(line):
            return None
        line = re.sub(r"\s+", " ", line)
        if not _ALLOWED.match(line) or re.search(r"\b[A-Z]{2,}\b", line) or "..." in line:
            return None
        n = len(line.split())
        return line if min_words <= n <= max_words else None
    return None


def words(text: str) -> list[str]:
    """Lower-case word tokens used for vocabulary counts and n-gram checks."""
    return re.findall(r"[a-z']+", text.lower().replace("-", " "))


def ngrams(text: str, n: int = 4) -> set[tuple[str, ...]]:
    w = words(text)
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


def overlapping(held: Iterable[str], train: Iterable[str], n: int = 4) -> list[str]:
    """Held-out lines that share at least one word n-gram with any training line."""
    seen: set[tuple[str, ...]] = set()
    for t in train:
        seen |= ngrams(t, n)
    return [h for h in held if ngrams(h, n) & seen]


def seed_vocabulary() -> dict[str, list[str]]:
    """wonderwords' noun/adjective/verb lists minus its profanity list (read from the package's files)."""
    root = resources.files("wonderwords") / "assets"
    bad = {w.strip().lower() for w in (root / "profanitylist.txt").read_text().splitlines()}

    def load(name: str) -> list[str]:
        out = []
        for w in (root / name).read_text().splitlines():
            w = w.strip()
            if w and w.lower() not in bad and re.fullmatch(r"[a-z][a-z\- ]*", w):
                out.append(w)
        return out

    return {"noun": load("nounlist.txt"), "adj": load("adjectivelist.txt"), "verb": load("verblist.txt")}


@dataclass
class TextLine:
    text: str
    task: str  # transcribe | qa
    kind: str
    seed_word: str

    def to_json(self) -> str:
        return json.dumps({"text": self.text, "task": self.task, "kind": self.kind, "seed_word": self.seed_word})


def make_prompts(n: int, seed: int) -> list[tuple[str, str, str, str, int]]:
    """(kind, task, prompt, seed word, sampling seed) for n generations; a pure function of ``seed``."""
    rng = random.Random(seed)
    vocab = seed_vocabulary()
    out = []
    for i in range(n):
        kind, task, template = KINDS[i % len(KINDS)]
        noun, adj, verb = rng.choice(vocab["noun"]), rng.choice(vocab["adj"]), rng.choice(vocab["verb"])
        number = rng.choice([rng.randint(2, 12), rng.randint(13, 99), rng.randint(100, 999), rng.randint(1900, 2030)])
        word = {"action": verb, "time": adj}.get(kind, noun)
        out.append((kind, task, template.format(noun=noun, adj=adj, verb=verb, number=number), word, seed * 1_000_003 + i))
    return out


def generate_lines(model: Path, n_prompts: int, *, seed: int, cache: Path, batch_size: int = 512,
                   max_tokens: int = 40, progress: bool = True) -> list[TextLine]:
    """Ask the base LLM (vLLM, bf16) for ``n_prompts`` lines; cached in ``cache`` (JSONL, resumable).

    Each cache line records the prompt index, so an interrupted run continues where it stopped
    and the result does not depend on how often it was interrupted.
    """
    prompts = make_prompts(n_prompts, seed)
    done: dict[int, str | None] = {}
    if cache.is_file():
        for line in cache.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a kill
            done[int(rec["i"])] = rec["raw"]
    todo = [i for i in range(n_prompts) if i not in done]
    if todo:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        from vllm import LLM, SamplingParams

        llm = LLM(model=str(model), dtype="bfloat16", max_model_len=256, seed=seed, enable_prefix_caching=True,
                  max_num_seqs=batch_size)
        cache.parent.mkdir(parents=True, exist_ok=True)
        with open(cache, "a") as f:
            for start in range(0, len(todo), batch_size):
                chunk = todo[start : start + batch_size]
                # one engine-level seed: vLLM-cpu fails on per-request seeds once a prefill is chunked
                params = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=max_tokens)
                outs = llm.chat([[{"role": "user", "content": prompts[i][2]}] for i in chunk], params, use_tqdm=False)
                for i, o in zip(chunk, outs):
                    done[i] = o.outputs[0].text
                    f.write(json.dumps({"i": i, "raw": o.outputs[0].text}) + "\n")
                f.flush()
                if progress:
                    print(f"texts: {n_prompts - len(todo) + start + len(chunk)}/{n_prompts} generations", file=sys.stderr, flush=True)
    lines: list[TextLine] = []
    seen: set[str] = set()
    for i in range(n_prompts):
        kind, task, _, word, _ = prompts[i]
        text = clean_line(done.get(i) or "")
        if text is None:
            continue
        if task == "qa" and not text.endswith("?"):
            continue
        key = " ".join(words(text))
        if key in seen:
            continue
        seen.add(key)
        lines.append(TextLine(text, task, kind, word))
    return lines


def markov_lines(n: int, seed: int, *, exclude: Iterable[str] = ()) -> list[TextLine]:
    """Up to ``n`` statements from essential-generators' word-trigram chain (built from encyclopedia
    text; it ships inside that PyPI package): broad vocabulary (names, places, numbers, science)
    at no LLM cost. Most transitions have one successor, so lines read like real sentences.
    """
    chain = json.loads((resources.files("essential_generators") / "markov_textgen.json").read_text())
    starts = sorted(k for k in chain if re.fullmatch(r"(The|A|An|In|It|This|He|She|They|Many|Most|Some|[A-Z][a-z]+) [a-z]+", k))
    rng = random.Random(seed)
    seen = {" ".join(words(t)) for t in exclude}
    out: list[TextLine] = []
    tries = 0
    while len(out) < n and tries < n * 20:
        tries += 1
        start = rng.choice(starts)
        w = start.split()
        while len(w) < 24 and not w[-1].endswith((".", "?", "!")):
            e = chain.get(" ".join(w[-2:]))
            if not e or not e.get("transitions"):
                break
            w.append(rng.choices(e["transitions"], weights=e["weights"])[0])
        text = clean_line(" ".join(w), min_words=5, max_words=18)
        if text is None or not text.endswith("."):
            continue
        key = " ".join(words(text))
        if key in seen:
            continue
        seen.add(key)
        out.append(TextLine(text, "transcribe", "wiki", start.split()[0]))
    return out


def split_heldout(lines: Sequence[TextLine], n_heldout: int, *, seed: int, n: int = 4) -> tuple[list[TextLine], list[TextLine]]:
    """Pick ``n_heldout`` lines (half qa) for held-out, then drop every training line sharing a word
    ``n``-gram with any of them, so no held-out 4-gram was ever heard in training.

    Candidates are taken in random order among those whose 4-grams are rarest in the pool (a
    held-out "how do I make ..." would otherwise remove every training question starting that
    way); how many training lines the rule removed is visible as the pool minus what is kept.
    """
    rng = random.Random(seed + 99)
    order = list(lines)
    rng.shuffle(order)
    df: dict[tuple[str, ...], int] = {}
    for t in order:
        for g in ngrams(t.text, n):
            df[g] = df.get(g, 0) + 1
    cost = {id(t): sum(df[g] - 1 for g in ngrams(t.text, n)) for t in order}
    ranked = sorted(order, key=lambda t: cost[id(t)])  # stable: random order within a cost
    qa = [t for t in ranked if t.task == "qa"]
    tr = [t for t in ranked if t.task == "transcribe"]
    held = qa[: n_heldout // 2] + tr[: n_heldout - n_heldout // 2]
    held_ids = {id(t) for t in held}
    train = drop_overlapping([t for t in order if id(t) not in held_ids], held, n)
    return train, held


def drop_overlapping(lines: Sequence[TextLine], held: Sequence[TextLine], n: int = 4) -> list[TextLine]:
    """``lines`` without those sharing a word ``n``-gram with any held-out line."""
    held_grams: set[tuple[str, ...]] = set()
    for t in held:
        held_grams |= ngrams(t.text, n)
    return [t for t in lines if not (ngrams(t.text, n) & held_grams)]


def interleave(a: Sequence[TextLine], b: Sequence[TextLine]) -> list[TextLine]:
    """Spread two sources evenly, so any prefix of the corpus has both (truncated runs stay mixed)."""
    if not a or not b:
        return list(a) + list(b)
    out: list[TextLine] = []
    ratio = len(b) / len(a)
    j = 0.0
    bi = 0
    for t in a:
        out.append(t)
        j += ratio
        while bi < len(b) and bi < j:
            out.append(b[bi])
            bi += 1
    out.extend(b[bi:])
    return out


def text_stats(lines: Sequence[TextLine]) -> dict[str, int]:
    vocab: set[str] = set()
    for t in lines:
        vocab.update(words(t.text))
    return {"lines": len(lines), "distinct_lines": len({t.text for t in lines}), "distinct_words": len(vocab),
            "qa": sum(t.task == "qa" for t in lines), "transcribe": sum(t.task == "transcribe" for t in lines)}
