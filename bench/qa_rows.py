"""Add answer (qa) rows to a transcription manifest: the same clips, asked as questions.

The demo corpus is mostly transcription rows (encyclopedia lines), so an adapter trained on it
learns to transcribe but rarely sees the turn it is served for: audio in, the LLM's answer out.
This adds a qa row (no ``response`` yet; ``aura data responses`` fills it with the base LLM's own
answer to the transcript, DiVA-style) for every everyday line and a seeded sample of the others.
The clips are shared, so the teacher cache and the corpus's held-out checks are unaffected.

    python -m bench.qa_rows --manifest $C/train.jsonl --out $C/train_qa.jsonl --wiki 1500
    python -m bench.qa_rows --manifest $C/train_qa.jsonl --out $C/train_qa_hearable.jsonl --wiki 0 --hearable

``--hearable`` keeps only the rows whose clip is not espeak-ng (Piper, flite, Festival: the voices the
teacher hears, README "teacher_hears"), since distillation passes on only what the teacher's states hold.
On a manifest that already has its qa rows (and their responses), ``--wiki 0 --hearable`` only filters.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from adapters.training.data import ManifestRow, read_manifest, write_manifest


def with_qa_rows(rows: list[ManifestRow], *, wiki: int, seed: int) -> list[ManifestRow]:
    """``rows`` plus one qa row per everyday transcription line and ``wiki`` sampled encyclopedia lines."""
    asked = {r.audio for r in rows if r.task == "qa"}
    candidates = [r for r in rows if r.task == "transcribe" and r.audio not in asked]
    everyday = [r for r in candidates if getattr(r, "kind", "wiki") != "wiki"]
    encyclopedic = [r for r in candidates if getattr(r, "kind", "wiki") == "wiki"]
    picked = everyday + random.Random(seed).sample(encyclopedic, min(wiki, len(encyclopedic)))
    extra = [ManifestRow.model_validate({**r.model_dump(exclude_none=True), "task": "qa"}) for r in picked]
    return rows + extra


def hearable(rows: list[ManifestRow]) -> list[ManifestRow]:
    """The rows spoken by an engine the teacher hears: every voice but espeak-ng's is named ``engine:voice``."""
    return [r for r in rows if ":" in str(getattr(r, "voice", ""))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--manifest", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--wiki", type=int, default=1500, help="encyclopedia lines that also become qa rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hearable", action="store_true", help="write only the rows whose clip is not espeak-ng")
    a = p.parse_args()
    rows = with_qa_rows(read_manifest(a.manifest, check_audio=False), wiki=a.wiki, seed=a.seed)
    if a.hearable:
        rows = hearable(rows)
    write_manifest(a.out, rows)
    print(f"{a.out}: {len(rows)} rows, {sum(r.task == 'qa' for r in rows)} qa")


if __name__ == "__main__":
    main()
