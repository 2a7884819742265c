"""Scoring for ``aura eval`` and training-time evaluation: WER, exact match and token F1.

Pure functions on strings. The evaluation driver that runs an adapter through the served
pipeline (and the ASR -> LLM cascade beside it) is ``server/evaluation.py``: it needs the
server's ``ChatService``, and ``adapters/`` never imports ``server``.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

_NUMBERS = {"0": "zero", "1": "one", "2": "two", "3": "three", "4": "four", "5": "five", "6": "six",
            "7": "seven", "8": "eight", "9": "nine", "10": "ten", "11": "eleven", "12": "twelve"}


def normalize_text(text: str) -> str:
    """Lower case, accents and punctuation removed, small digits spelled out, whitespace collapsed.

    WER on raw strings would mostly count commas and capitals; this is the usual
    Whisper-style normalisation, kept simple and deterministic.
    """
    text = re.sub(r"[^\w']+", " ", text)  # dashes and other symbols separate words
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    text = re.sub(r"[^a-z0-9' ]+", " ", text.replace("-", " "))
    text = text.replace("'", "")
    words = [_NUMBERS.get(w, w) for w in text.split()]
    return " ".join(words)


def edit_distance(ref: list[str], hyp: list[str]) -> int:
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def wer(refs: list[str], hyps: list[str]) -> float:
    """Corpus WER: total word edits / total reference words, after :func:`normalize_text`."""
    edits = words = 0
    for r, h in zip(refs, hyps, strict=True):
        rw, hw = normalize_text(r).split(), normalize_text(h).split()
        edits += edit_distance(rw, hw)
        words += len(rw)
    return edits / max(1, words)


def cer(refs: list[str], hyps: list[str]) -> float:
    """Corpus character error rate: total character edits / total reference characters (texts as given)."""
    edits = sum(edit_distance(list(r), list(h)) for r, h in zip(refs, hyps, strict=True))
    return edits / max(1, sum(len(r) for r in refs))


def exact_match(ref: str, hyp: str) -> float:
    return float(normalize_text(ref) == normalize_text(hyp))


def token_f1(ref: str, hyp: str) -> float:
    """SQuAD-style bag-of-words F1 between normalised answers."""
    r, h = normalize_text(ref).split(), normalize_text(hyp).split()
    if not r and not h:
        return 1.0
    common = sum((Counter(r) & Counter(h)).values())
    if common == 0:
        return 0.0
    p, rc = common / len(h), common / len(r)
    return 2 * p * rc / (p + rc)
