"""End of speech -> first answer token: the realtime socket (prefilled while the user speaks)
against the one-shot POST of the same clip and against a cascade, for clips of about 2, 5 and 10 s.

Each clip is streamed to /v1/realtime in 100 ms appends at real-time pace; the clock starts
when the last append and the commit are sent (end of speech) and stops at the first
``response.output_text.delta``. The one-shot figure is the TTFT of POST /v1/audio/chat with the
same audio sent at that same moment (upload, decode, features, audio layer and the whole prefill
included). The cascade figure (with ``--whisper``) is Whisper's greedy transcription of the clip
in this process (the ASR half, from end of speech) plus the TTFT of the transcript as a text
chat request to the same server (the LLM half). Run against a server you started (e.g.
``aura serve`` on the demo model):

    python -m bench.realtime --url http://127.0.0.1:8000 --clips 20 --lengths 2 5 10 \
        --whisper ~/.cache/aura/models/whisper-tiny.en

Prints one table (p50/p90 per length) and, last, one JSON line with every number.
"""

from __future__ import annotations

import argparse
import base64
import json
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from websockets.sync.client import connect

from adapters.audio import decode_audio
from bench.common import QUESTIONS, VOICES, make_clips, pct

RATE = 24000
STEP = RATE // 10 * 2  # 100 ms of PCM16 bytes


def clip_of_length(parts: list[Path], seconds: float, gain: float = 1.0) -> bytes:
    """PCM16 at 24 kHz: spoken questions joined (with 200 ms gaps) until ``seconds`` is reached."""
    pieces, total = [], 0.0
    gap = np.zeros(int(0.2 * RATE), dtype=np.float32)
    i = 0
    while total < seconds:
        s = decode_audio(parts[i % len(parts)].read_bytes(), sample_rate=RATE).samples
        pieces += [s, gap]
        total += len(s) / RATE + 0.2
        i += 1
    samples = np.concatenate(pieces)[: int(seconds * RATE)] * gain
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


def wav_bytes(pcm: bytes) -> bytes:
    from server.realtime import pcm16_wav

    return pcm16_wav(pcm, RATE)


def realtime_ttft(url: str, adapter: str, pcm: bytes, max_tokens: int) -> float:
    ws_url = url.replace("http://", "ws://").replace("https://", "wss://") + f"/v1/realtime?model={adapter}"
    with connect(ws_url, open_timeout=60) as ws:
        json.loads(ws.recv(timeout=60))
        ws.send(json.dumps({"type": "session.update", "session": {
            "max_output_tokens": max_tokens,
            "audio": {"input": {"format": {"type": "audio/pcm", "rate": RATE}, "turn_detection": None}}}}))
        json.loads(ws.recv(timeout=60))
        next_at = time.perf_counter()
        for i in range(0, len(pcm), STEP):
            ws.send(json.dumps({"type": "input_audio_buffer.append",
                                "audio": base64.b64encode(pcm[i:i + STEP]).decode()}))
            next_at += 0.1
            time.sleep(max(0.0, next_at - time.perf_counter()))
        t_end = time.perf_counter()
        ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        ws.send(json.dumps({"type": "response.create"}))
        first = None
        while True:
            event = json.loads(ws.recv(timeout=300))
            if event["type"] == "response.output_text.delta" and first is None:
                first = time.perf_counter() - t_end
            if event["type"] == "error":
                raise RuntimeError(event["error"])
            if event["type"] == "response.done":
                return first if first is not None else float("nan")


def one_shot_ttft(url: str, adapter: str, pcm: bytes, max_tokens: int) -> float:
    t0 = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/audio/chat", files={"file": ("q.wav", wav_bytes(pcm), "audio/wav")},
                      data={"adapter": adapter, "max_tokens": str(max_tokens), "stream": "true"}, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
                return time.perf_counter() - t0
    return float("nan")


def cascade_ttft(url: str, adapter: str, pcm: bytes, max_tokens: int, asr) -> float:
    """Whisper transcribes the clip, then the transcript goes to the LLM as text: end of speech
    to the first answer token of that text request."""
    import torch

    t0 = time.perf_counter()
    samples = decode_audio(wav_bytes(pcm), sample_rate=asr.features.sample_rate).samples
    text = asr.transcribe(torch.from_numpy(samples.copy()))
    body = {"model": adapter, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
                return time.perf_counter() - t0
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True)
    ap.add_argument("--adapter", default="default")
    ap.add_argument("--clips", type=int, default=20, help="clips per length")
    ap.add_argument("--lengths", type=float, nargs="+", default=[2.0, 5.0, 10.0])
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--whisper", type=Path, help="a transformers Whisper folder: also time the ASR -> LLM cascade")
    args = ap.parse_args()
    asr = None
    if args.whisper is not None:
        from server.evaluation import WhisperASR

        asr = WhisperASR(args.whisper.expanduser())
    work = Path(tempfile.mkdtemp(prefix="aura-bench-rt-"))
    parts = make_clips(work / "parts", len(QUESTIONS) * len(VOICES))
    rows: dict[str, dict[str, list[float]]] = {}
    for seconds in args.lengths:
        rt, shot, casc = [], [], []
        for i in range(args.clips):
            rotated = parts[i:] + parts[:i]  # a different clip each time: nothing cached from the last run
            rt.append(realtime_ttft(args.url, args.adapter, clip_of_length(rotated, seconds), args.max_tokens))
            # The same speech 3% quieter: different audio vectors, so nothing from the realtime
            # run is in the prefix cache and the one-shot pays its whole prefill, as it would.
            shot.append(one_shot_ttft(args.url, args.adapter, clip_of_length(rotated, seconds, 0.97), args.max_tokens))
            if asr is not None:
                casc.append(cascade_ttft(args.url, args.adapter, clip_of_length(rotated, seconds), args.max_tokens, asr))
        rows[f"{seconds:g}"] = {"realtime_s": rt, "one_shot_s": shot, "cascade_s": casc}
        print(f"{seconds:>5g} s clips: end-of-speech->first token realtime p50 {pct(rt, 50) * 1000:7.1f} ms "
              f"p90 {pct(rt, 90) * 1000:7.1f} ms | one-shot TTFT p50 {pct(shot, 50) * 1000:7.1f} ms "
              f"p90 {pct(shot, 90) * 1000:7.1f} ms | ratio p50 {pct(rt, 50) / pct(shot, 50):.2f}"
              + (f" | cascade p50 {pct(casc, 50) * 1000:7.1f} ms p90 {pct(casc, 90) * 1000:7.1f} ms" if casc else ""),
              flush=True)
    subprocess.run(["rm", "-rf", str(work)], check=False)
    print(json.dumps({"lengths": rows}))


if __name__ == "__main__":
    main()
