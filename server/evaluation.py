"""``aura eval``: an AuRA adapter, run through the served pipeline, against the ASR -> LLM cascade.

The AuRA side is the server's own path — ``ChatService.run`` (admission, adapter lease, decode,
log-mel, the adapter's audio layer, chat-template prompt, engine) — on the plain-PyTorch
reference engine, so what is evaluated is exactly what is served. With no ``--adapter`` it
evaluates the adapter the server would serve by default (the embedded demo adapter when it fits
the base model). The cascade runs on the same engine (the base LLM, no LoRA), so the latency
numbers compare the methods, not two engines. Per clip:

* AuRA: the served pipeline on the clip's bytes, with the row's prompt after the audio.
* Cascade: decode -> Whisper transcribes (greedy) -> for ``transcribe`` rows that transcript is
  the output; for ``qa`` rows the same LLM (no LoRA) answers the transcript.

``transcribe`` rows score WER on normalised text. ``qa`` rows score agreement with the base
LLM's own answer to the true transcript (exact match after normalisation, and token F1): the
target the adapter was trained toward, DiVA-style. Latency: TTFT (time to the first generated
token, including audio decoding, features and, for the cascade, the full ASR pass) and total.
The metrics themselves are pure functions in ``adapters/training/evaluate.py``.

This module lives in ``server/`` because it runs the server's pipeline; ``adapters/`` never
imports ``server``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import statistics
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from adapters.audio import load_audio_file
from adapters.features import FeatureConfig, log_mel
from adapters.training.data import ManifestRow, read_manifest, row_prompt_text, text_question
from adapters.training.evaluate import exact_match, token_f1, wer
from server.config import Settings
from server.context import RequestContext
from server.engine.base import Engine, GenerationRequest, SamplingOptions
from server.serving import AudioInput, ChatJob, Started, TextDelta
from server.state import ServerState, build_state

log = logging.getLogger(__name__)

EVAL_ADAPTER = "eval"


@dataclass
class EvalOptions:
    manifest: Path
    model: Path | None = None  # None: the demo model
    adapter: Path | None = None  # None: the adapter the server serves by default (the demo adapter)
    teacher: Path | None = None  # None: no cascade baseline
    limit: int | None = None
    max_tokens: int = 64
    threads: int | None = None
    transcribe_prompt: str | None = None
    reference: str = "engine"  # or "manifest"
    progress: bool = True
    details: Path | None = None
    home: Path | None = None  # models and adapter cache (default: the server's)


class WhisperASR:
    """Greedy Whisper transcription on the same features recipe the teacher saw in training."""

    def __init__(self, path: Path) -> None:
        from transformers import WhisperForConditionalGeneration, WhisperTokenizer

        self.model = WhisperForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32).eval()
        self.tokenizer = WhisperTokenizer.from_pretrained(str(path))
        self.frames = 2 * self.model.config.max_source_positions
        self.features = FeatureConfig(n_mels=self.model.config.num_mel_bins)

    @torch.inference_mode()
    def transcribe(self, samples: torch.Tensor) -> str:
        from transformers.utils import logging as hf_logging

        feats, _ = log_mel([samples], self.features, pad_to_frames=self.frames)
        # Whisper's generate sets max_length from its generation config itself and then warns, once per clip,
        # that max_new_tokens wins: 180 lines of noise in a quiet-by-default eval of 90 clips.
        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            ids = self.model.generate(input_features=feats, max_new_tokens=96)
        finally:
            hf_logging.set_verbosity(level)
        return self.tokenizer.decode(ids[0], skip_special_tokens=True).strip()


def _lat(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ms = sorted(v * 1000 for v in values)
    return {"mean_ms": round(statistics.fmean(ms), 1), "p50_ms": round(statistics.median(ms), 1),
            "p90_ms": round(ms[min(len(ms) - 1, int(0.9 * len(ms)))], 1)}


def _chat_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                              add_generation_prompt=True, return_dict=False))


async def _base_llm(engine: Engine, ids: list[int], max_tokens: int, t0: float) -> tuple[str, float, float]:
    """The base LLM (no LoRA, text only) on the same engine: the cascade's second stage."""
    req = GenerationRequest(request_id=uuid.uuid4().hex, token_ids=ids, is_token_ids=[True] * len(ids),
                            audio_embeds=torch.zeros(0, engine.hidden_size),
                            sampling=SamplingOptions(max_tokens=max_tokens, temperature=0.0))
    text, ttft = "", None
    async for chunk in engine.generate(req):
        if ttft is None and chunk.token_ids:
            ttft = time.perf_counter() - t0
        text += chunk.text
    total = time.perf_counter() - t0
    return text, ttft if ttft is not None else total, total


async def _served(state: ServerState, adapter: str, audio: bytes, prompt: str | None,
                  max_tokens: int) -> tuple[str, float, float]:
    """The served pipeline on one clip: (text, TTFT, total), both from the request's arrival."""
    parts: list[str | AudioInput] = [AudioInput(audio)] + ([prompt] if prompt else [])
    job = ChatJob(adapter=adapter, turns=[("user", parts)], max_tokens=max_tokens, stream=True)
    ctx = RequestContext.local(state.settings.request_timeout_s, tenant="eval")
    texts: list[str] = []
    ttft = None
    async for chunk in state.service.run(job, ctx):
        if isinstance(chunk, TextDelta):
            if ttft is None and chunk.token_ids:
                ttft = time.perf_counter() - ctx.arrived_at
            texts.append(chunk.text)
        elif isinstance(chunk, Started):
            continue
    total = time.perf_counter() - ctx.arrived_at
    return "".join(texts), ttft if ttft is not None else total, total


def eval_settings(opts: EvalOptions) -> Settings:
    """The server's settings for an in-process evaluation on the reference engine."""
    overrides: dict[str, Any] = {"engine": "reference", "model": opts.model, "log_requests": False,
                                 "max_tokens_limit": max(opts.max_tokens, 1)}
    if opts.adapter is not None:
        overrides["adapters"] = {EVAL_ADAPTER: str(opts.adapter)}
    if opts.home is not None:
        overrides["home"] = opts.home
    return Settings(**overrides)


async def _run(opts: EvalOptions) -> dict[str, Any]:
    rows = read_manifest(opts.manifest)[: opts.limit]
    base_dir = Path(opts.manifest).parent
    state = await build_state(eval_settings(opts))
    try:
        adapter_name = state.service.resolve_adapter(EVAL_ADAPTER if opts.adapter is not None else None)
        version = state.registry.get(adapter_name)
        if not version.trained:
            log.warning("evaluating an UNTRAINED adapter", extra={"adapter": adapter_name})
        prompt_for_transcribe = opts.transcribe_prompt or version.adapter.config.training.get(
            "transcribe_prompt", "Transcribe the audio.")
        whisper = WhisperASR(opts.teacher) if opts.teacher is not None else None
        engine, tokenizer = state.engine, state.tokenizer

        async def aura(row: ManifestRow, path: Path) -> tuple[str, float, float]:
            return await _served(state, adapter_name, path.read_bytes(), row_prompt_text(row, prompt_for_transcribe),
                                 opts.max_tokens)

        async def cascade(row: ManifestRow, path: Path) -> tuple[str, float, float, str]:
            assert whisper is not None
            t0 = time.perf_counter()
            samples = torch.from_numpy(load_audio_file(path, sample_rate=whisper.features.sample_rate).samples.copy())
            transcript = whisper.transcribe(samples)
            if row.task == "transcribe":
                done = time.perf_counter() - t0  # ASR output is the answer; it arrives all at once
                return transcript, done, done, transcript
            question = transcript if not row.prompt else transcript + "\n" + row.prompt
            text, ttft, total = await _base_llm(engine, _chat_ids(tokenizer, question), opts.max_tokens, t0)
            return text, ttft, total, transcript

        # warm both paths once so lazy initialisation is not billed to the first clip
        if rows:
            warm_path = rows[0].audio_path(base_dir)
            await aura(rows[0], warm_path)
            if whisper is not None:
                await cascade(rows[0], warm_path)

        results: list[dict[str, Any]] = []
        for row in tqdm(rows, desc="eval", file=sys.stderr, disable=not opts.progress):
            path = row.audio_path(base_dir)
            rec: dict[str, Any] = {"audio": row.audio, "task": row.task, "text": row.text}
            if row.task == "qa":
                if opts.reference == "manifest" and row.response is not None:
                    rec["reference"] = row.response
                else:
                    ids = _chat_ids(tokenizer, text_question(row))
                    rec["reference"] = (await _base_llm(engine, ids, opts.max_tokens, time.perf_counter()))[0]
            target = row.text if row.task == "transcribe" else rec["reference"]
            rec["aura"], rec["aura_ttft"], rec["aura_total"] = await aura(row, path)
            if whisper is not None:
                rec["cascade"], rec["cascade_ttft"], rec["cascade_total"], rec["asr"] = await cascade(row, path)
            for system in ("aura", "cascade"):
                if system in rec and row.task == "qa":
                    rec[f"{system}_em"] = exact_match(target, rec[system])
                    rec[f"{system}_f1"] = token_f1(target, rec[system])
            results.append(rec)
    finally:
        state.frontend.close()
        await state.engine.shutdown()
    if opts.details is not None:
        opts.details.write_text("".join(json.dumps(r) + "\n" for r in results))

    summary: dict[str, Any] = {
        "manifest": str(opts.manifest), "clips": len(results), "adapter": adapter_name,
        "adapter_source": version.source, "adapter_trained": version.trained, "model": str(state.model_path),
        "teacher": str(opts.teacher) if opts.teacher else None,
        "engine": "reference (transformers, float32, cpu) via ChatService.run", "threads": torch.get_num_threads()}
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


def run_eval(opts: EvalOptions) -> dict[str, Any]:
    """Evaluate and return the summary dict (what ``aura eval`` prints as its last line)."""
    if opts.threads:
        torch.set_num_threads(opts.threads)
    return asyncio.run(_run(opts))
