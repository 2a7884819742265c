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


def fill_responses(manifest: Path, model: Path, *, out: Path | None = None, max_tokens: int = 64,
                   overwrite: bool = False, batch_size: int = 256) -> int:
    """Fill ``response`` of qa rows (those without one unless ``overwrite``); returns how many were filled."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    rows = read_manifest(manifest)
    todo = [i for i, r in enumerate(rows) if r.task == "qa" and (overwrite or r.response is None)]
    if todo:
        from vllm import LLM, SamplingParams

        llm = LLM(model=str(model), max_model_len=1024, seed=0, enable_prefix_caching=True)
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
        # identical questions are asked once: greedy answers are a function of the question
        unique = sorted({text_question(rows[i]) for i in todo})
        answers: dict[str, str] = {}
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
