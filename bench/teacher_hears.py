"""Does the teacher hear the corpus? Whisper's WER on a manifest's clips vs the same lines re-voiced.

Layer-wise distillation can only pass on what the teacher's encoder states hold. This transcribes
a manifest's clips with the teacher (greedy Whisper, the cascade's recipe) and, for comparison,
the same lines spoken by another TTS: one of the corpus's flite/Festival voices (``--voice
flite:slt``, ``--voice festival:ked_diphone``: the builder's own renderer), or a command that reads
the text on stdin and takes ``-f OUT.wav`` (e.g. a Piper voice: ``python -m piper -m
en_US-joe-medium.onnx``).

    python -m bench.teacher_hears --manifest C/heldout.jsonl --limit 40 --voice flite:slt [--out DIR]
    python -m bench.teacher_hears --manifest C/heldout.jsonl --limit 20 \\
        --tts "python -m piper -m .../en_US-joe-medium.onnx"

``--out`` keeps the re-voiced clips and writes ``DIR/manifest.jsonl``: the same rows (responses
included) on the new clips, for ``bench.audio_use`` or ``aura eval``. Such a set shares its voice
with any corpus trained on that voice: it measures unseen sentences, not unseen voices.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

import torch

from adapters.audio import load_audio_file
from adapters.provision.demo import DEMO_TEACHER_NAME, demo_models_dir
from adapters.training.data import read_manifest_absolute, write_manifest
from adapters.training.evaluate import wer
from adapters.training.system_voices import SystemVoice, speak_system
from adapters.training.voices import write_wav
from server.evaluation import WhisperASR


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--manifest", type=Path, required=True)
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--teacher", type=Path, help="Whisper folder (default: the demo teacher, as `aura models demo` converts it)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--tts", help="command that reads text on stdin and writes the WAV named by -f")
    how.add_argument("--voice", help="a flite/Festival voice as ENGINE:NAME (flite:slt, festival:kal_diphone), at its own pace")
    p.add_argument("--out", type=Path, help="keep the re-voiced clips here, with manifest.jsonl")
    a = p.parse_args()
    rows = read_manifest_absolute(a.manifest)[: a.limit]
    asr = WhisperASR(a.teacher or demo_models_dir() / DEMO_TEACHER_NAME)
    refs, corpus_hyp, tts_hyp = [], [], []
    revoiced = []
    with (nullcontext(str(a.out)) if a.out else tempfile.TemporaryDirectory()) as tmp:
        Path(tmp).mkdir(parents=True, exist_ok=True)
        for i, r in enumerate(rows):
            out = Path(tmp) / f"{i:06d}.wav"
            revoiced.append(r.model_copy(update={"audio": out.name, "voice": a.voice or a.tts}))
            if a.voice:
                engine, _, name = a.voice.partition(":")
                write_wav(out, speak_system(r.text, SystemVoice(engine, name, 1.0)))
            else:
                subprocess.run([*shlex.split(a.tts), "-f", str(out)], input=r.text.encode(), check=True, capture_output=True,
                               timeout=120)
            refs.append(r.text)
            corpus_hyp.append(asr.transcribe(torch.from_numpy(load_audio_file(r.audio).samples.copy())))
            tts_hyp.append(asr.transcribe(torch.from_numpy(load_audio_file(out).samples.copy())))
            print(f"{i + 1}/{len(rows)}", file=sys.stderr, end="\r")
        if a.out:
            write_manifest(a.out / "manifest.jsonl", revoiced)
    print(json.dumps({"clips": len(rows), "manifest": str(a.manifest), "tts": a.voice or a.tts,
                      "wer_corpus_clips": round(wer(refs, corpus_hyp), 3), "wer_same_lines_tts": round(wer(refs, tts_hyp), 3)}))


if __name__ == "__main__":
    main()
