"""DiVA-style answer targets: the base LLM's own greedy reply to each qa row's transcript.

Training the adapter to give, from speech, the answer the LLM gives to the same words as text
keeps the LLM's behaviour (tone, length, knowledge) instead of teaching it a labeller's style,
and needs no labels beyond the transcript. Runs vLLM's offline ``LLM`` with the model's chat
template. vLLM spawns worker processes, so callers' scripts need an ``if __name__ == "__main__":``
guard.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from adapters.training.data import read_manifest, text_question, write_manifest


def known_answers(manifests: list[Path]) -> dict[str, str]:
    """Question -> answer of every answered qa row of ``manifests`` (later files win).

    Why: greedy answers are a function of the question (with the same model and ``max_tokens``), so a
    rebuilt corpus whose clips changed but whose lines did not (new voices) needs no vLLM run: the
    responses stage rebuilds its rows and takes the answers from the manifest it replaces."""
    answers: dict[str, str] = {}
    for path in manifests:
        for r in read_manifest(path, check_audio=False):
            if r.task == "qa" and r.response is not None:
                answers[text_question(r)] = r.response
    return answers


def fill_responses(manifest: Path, model: Path, *, out: Path | None = None, max_tokens: int = 64,
                   overwrite: bool = False, batch_size: int = 256, answers_from: list[Path] | None = None) -> int:
    """Fill ``response`` of qa rows (those without one unless ``overwrite``); returns how many were filled.

    A question answered in one of ``answers_from`` (manifests written by this function with the same
    model and ``max_tokens``; the caller vouches for that) takes that answer; vLLM runs only for the rest."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    rows = read_manifest(manifest)
    todo = [i for i, r in enumerate(rows) if r.task == "qa" and (overwrite or r.response is None)]
    answers = known_answers(answers_from or [])
    unique = sorted({text_question(rows[i]) for i in todo} - answers.keys())
    if unique:
        from vllm import LLM, SamplingParams

        llm = LLM(model=str(model), max_model_len=1024, seed=0, enable_prefix_caching=True)
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
        # identical questions are asked once: greedy answers are a function of the question
        for start in range(0, len(unique), batch_size):
            chunk = unique[start : start + batch_size]
            outs = llm.chat([[{"role": "user", "content": q}] for q in chunk], params, use_tqdm=False)
            for q, o in zip(chunk, outs):
                answers[q] = o.outputs[0].text.strip()
            print(f"responses: {min(start + batch_size, len(unique))}/{len(unique)}", file=sys.stderr)
    for i in todo:
        rows[i].response = answers[text_question(rows[i])]
    write_manifest(out or manifest, rows)
    return len(todo)
