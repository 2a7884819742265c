"""``aura eval``: an AuRA adapter against the ASR -> LLM cascade on the same clips, same engine.

Both pipelines run through one :class:`server.engine.reference.ReferenceEngine` (plain PyTorch,
one request at a time, the base LLM with or without the adapter's LoRA), so the latency numbers
compare the methods, not two engines. Per clip:

* AuRA: decode -> log-mel -> the adapter's audio layer -> one LLM pass over [text, audio, text].
* Cascade: decode -> Whisper transcribes (greedy) -> for ``transcribe`` rows that transcript is
  the output; for ``qa`` rows the same LLM (no LoRA) answers the transcript.

``transcribe`` rows score WER on normalised text. ``qa`` rows score agreement with the base
LLM's own answer to the true transcript (exact match after normalisation, and token F1): the
target the adapter was trained toward, DiVA-style. Latency: TTFT (time to the first generated
token, including audio decoding, features and, for the cascade, the full ASR pass) and total.
"""

from __future__ import annotations

import asyncio
import re
import statistics
import sys
import time
import unicodedata
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from adapters.audio import load_audio_file
from adapters.features import FeatureConfig, log_mel
from adapters.prompt import build_prompt, user_turn
from adapters.training.data import ManifestRow, read_manifest, row_prompt_text, text_question

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


@dataclass
class EvalOptions:
    manifest: Path
    model: Path
    adapter: Path | None = None
    teacher: Path | None = None
    limit: int | None = None
    max_tokens: int = 64
    threads: int | None = None
    transcribe_prompt: str | None = None
    reference: str = "engine"  # or "manifest"
    progress: bool = True
    details: Path | None = None


class _Runner:
    """Synchronous wrapper around the async reference engine; measures TTFT and total per request."""

    def __init__(self, model: Path, adapter: Path | None) -> None:
        from transformers import AutoTokenizer

        from server.engine.base import LoraHandle
        from server.engine.reference import ReferenceEngine

        self.tokenizer = AutoTokenizer.from_pretrained(str(model))
        self.engine = ReferenceEngine(model=str(model), tokenizer=self.tokenizer)
        self.loop = asyncio.new_event_loop()
        self.handle = None
        if adapter is not None:
            self.handle = LoraHandle(name=adapter.name, lora_id=1, path=adapter)
            self.loop.run_until_complete(self.engine.add_lora(self.handle))

    def generate(self, token_ids: list[int], is_token_ids: list[bool], audio: torch.Tensor | None, *,
                 lora: bool, max_tokens: int, t0: float) -> tuple[str, float, float]:
        """Returns (text, ttft_s, total_s), both measured from ``t0``."""
        from server.engine.base import GenerationRequest, SamplingOptions

        req = GenerationRequest(
            request_id=uuid.uuid4().hex, token_ids=token_ids, is_token_ids=is_token_ids,
            audio_embeds=audio if audio is not None else torch.zeros(0, self.engine.hidden_size),
            sampling=SamplingOptions(max_tokens=max_tokens, temperature=0.0), lora=self.handle if lora else None,
        )

        async def go() -> tuple[str, float, float]:
            text, ttft = "", None
            async for chunk in self.engine.generate(req):
                if ttft is None and chunk.token_ids:
                    ttft = time.perf_counter() - t0
                text += chunk.text
            total = time.perf_counter() - t0
            return text, ttft if ttft is not None else total, total

        return self.loop.run_until_complete(go())

    def chat_ids(self, text: str) -> list[int]:
        return list(self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                                       add_generation_prompt=True, return_dict=False))


class _Whisper:
    """Greedy Whisper transcription on the same features recipe the teacher saw in training."""

    def __init__(self, path: Path) -> None:
        from transformers import WhisperForConditionalGeneration, WhisperTokenizer

        self.model = WhisperForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32).eval()
        self.tokenizer = WhisperTokenizer.from_pretrained(str(path))
        self.frames = 2 * self.model.config.max_source_positions
        self.features = FeatureConfig(n_mels=self.model.config.num_mel_bins)

    @torch.inference_mode()
    def transcribe(self, samples: torch.Tensor) -> str:
        feats, _ = log_mel([samples], self.features, pad_to_frames=self.frames)
        ids = self.model.generate(input_features=feats, max_new_tokens=96)
        return self.tokenizer.decode(ids[0], skip_special_tokens=True).strip()


def _lat(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ms = sorted(v * 1000 for v in values)
    return {"mean_ms": round(statistics.fmean(ms), 1), "p50_ms": round(statistics.median(ms), 1),
            "p90_ms": round(ms[min(len(ms) - 1, int(0.9 * len(ms)))], 1)}


def run_eval(opts: EvalOptions) -> dict[str, Any]:
    """Evaluate and return the summary dict (what ``aura eval`` prints as its last line)."""
    import json

    if opts.threads:
        torch.set_num_threads(opts.threads)
    rows = read_manifest(opts.manifest)[: opts.limit]
    base_dir = Path(opts.manifest).parent
    runner = _Runner(opts.model, opts.adapter)
    adapter = None
    prompt_for_transcribe = opts.transcribe_prompt or "Transcribe the audio."
    if opts.adapter is not None:
        from adapters.adapter import load_adapter
        from adapters.validate import validate_adapter

        validate_adapter(opts.adapter)
        adapter = load_adapter(opts.adapter)
        if opts.transcribe_prompt is None:
            prompt_for_transcribe = adapter.config.training.get("transcribe_prompt", prompt_for_transcribe)
    whisper = _Whisper(opts.teacher) if opts.teacher is not None else None

    def aura(row: ManifestRow, path: Path) -> tuple[str, float, float]:
        assert adapter is not None
        t0 = time.perf_counter()
        samples = torch.from_numpy(load_audio_file(path, sample_rate=adapter.config.features.sample_rate).samples.copy())
        with torch.inference_mode():
            feats, frames = log_mel([samples], adapter.config.features)
            emb, n = adapter.audio_layer(feats, frames)
        prompt = build_prompt(runner.tokenizer, adapter.config.prompt, [user_turn(int(n[0]), row_prompt_text(row, prompt_for_transcribe))])
        return runner.generate(prompt.token_ids, prompt.is_token_ids, emb[0, : int(n[0])], lora=True,
                               max_tokens=opts.max_tokens, t0=t0)

    def cascade(row: ManifestRow, path: Path) -> tuple[str, float, float, str]:
        assert whisper is not None
        t0 = time.perf_counter()
        samples = torch.from_numpy(load_audio_file(path, sample_rate=whisper.features.sample_rate).samples.copy())
        transcript = whisper.transcribe(samples)
        if row.task == "transcribe":
            done = time.perf_counter() - t0  # ASR output is the answer; it arrives all at once
            return transcript, done, done, transcript
        question = transcript if not row.prompt else transcript + "\n" + row.prompt
        ids = runner.chat_ids(question)
        text, ttft, total = runner.generate(ids, [True] * len(ids), None, lora=False, max_tokens=opts.max_tokens, t0=t0)
        return text, ttft, total, transcript

    # warm both paths once so lazy initialisation is not billed to the first clip
    if rows:
        warm_path = rows[0].audio_path(base_dir)
        if adapter is not None:
            aura(rows[0], warm_path)
        if whisper is not None:
            cascade(rows[0], warm_path)

    results: list[dict[str, Any]] = []
    for row in tqdm(rows, desc="eval", file=sys.stderr, disable=not opts.progress):
        path = row.audio_path(base_dir)
        rec: dict[str, Any] = {"audio": row.audio, "task": row.task, "text": row.text}
        if row.task == "qa":
            if opts.reference == "manifest" and row.response is not None:
                rec["reference"] = row.response
            else:
                ids = runner.chat_ids(text_question(row))
                rec["reference"] = runner.generate(ids, [True] * len(ids), None, lora=False,
                                                   max_tokens=opts.max_tokens, t0=time.perf_counter())[0]
        target = row.text if row.task == "transcribe" else rec["reference"]
        if adapter is not None:
            rec["aura"], rec["aura_ttft"], rec["aura_total"] = aura(row, path)
        if whisper is not None:
            rec["cascade"], rec["cascade_ttft"], rec["cascade_total"], rec["asr"] = cascade(row, path)
        for system in ("aura", "cascade"):
            if system in rec and row.task == "qa":
                rec[f"{system}_em"] = exact_match(target, rec[system])
                rec[f"{system}_f1"] = token_f1(target, rec[system])
        results.append(rec)
    if opts.details is not None:
        opts.details.write_text("".join(json.dumps(r) + "\n" for r in results))

    summary: dict[str, Any] = {"manifest": str(opts.manifest), "clips": len(results), "adapter": str(opts.adapter) if opts.adapter else None,
                               "model": str(opts.model), "teacher": str(opts.teacher) if opts.teacher else None,
                               "engine": "reference (transformers, float32, cpu)", "threads": torch.get_num_threads()}
    tr = [r for r in results if r["task"] == "transcribe"]
    qa = [r for r in results if r["task"] == "qa"]
    for system in ("aura", "cascade"):
        if not results or system not in results[0]:
            continue
        block: dict[str, Any] = {}
        if tr:
            block["wer"] = round(wer([r["text"] for r in tr], [r[system] for r in tr]), 4)
        if qa:
            block["qa_em"] = round(statistics.fmean(r[f"{system}_em"] for r in qa), 4)
            block["qa_f1"] = round(statistics.fmean(r[f"{system}_f1"] for r in qa), 4)
        block["ttft"] = _lat([r[f"{system}_ttft"] for r in results])
        block["total"] = _lat([r[f"{system}_total"] for r in results])
        if qa:
            block["qa_ttft"] = _lat([r[f"{system}_ttft"] for r in qa])
        summary[system] = block
    summary["n_transcribe"], summary["n_qa"] = len(tr), len(qa)
    return summary
