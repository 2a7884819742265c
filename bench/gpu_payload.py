"""Move a training run to a bare GPU machine that has PyTorch but no FFmpeg, vLLM or registry.

Such a lease (this project's GPU machines) receives at most ~48 MiB of files per call, so the
run's inputs travel as a payload split into parts: the corpus clips as 16 long Opus streams
(12 kb/s speech; one stream per decoding process) with a sample-offset index, the demo LLM as
its original GGUF file (converted there by the same code as here, and checked tensor by tensor
against this machine's conversion) with this machine's tokenizer files (another transformers
version converts the same GGUF tokenizer with another eos and no pad: 5.17 there, 5.19 here), the Whisper encoder in fp16 (lossless: the teacher's
weights are fp16 to begin with), the manifests and the few wheels the trainer needs.

    python -m bench.gpu_payload pack --corpus C --manifest C/train_qa.jsonl --manifest C/heldout_resp.jsonl \
        --gguf SmolLM2-135M-Instruct.Q4_1.gguf --llm $AURA_HOME/models/smollm2-135m-instruct \
        --teacher $AURA_HOME/models/whisper-tiny.en --wheels WHEELS --out .aura/gpu/payload   # here
    python -m bench.gpu_payload parts --payload .aura/gpu/payload --out .aura/gpu/parts   # here: carry-sized folders
    python -m bench.gpu_payload unpack --payload P --out W                 # there (bench/train_demo_gpu.sh)

``parts`` splits the payload into folders of at most ``--mib`` MiB (whole files, largest first; a larger
file, the GGUF, in pieces), one per device call: each call carries one folder and copies it into the same
payload folder there, and ``join`` (the first thing bench/train_demo_gpu.sh does) puts the pieces back
together (bench/GPU_PLAN.md has the calls). The working tree travels with every call too (~17 MiB), hence 44.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import wave
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np

SHARDS = 16
RATE = 16000
# what the converted LLM's turns depend on: travels from here so both machines train on one tokenizer
LLM_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def weights_digest(folder: Path) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, plus what the tokenizer says about
    turns (chat template, special tokens, the end-of-turn token): equal digests = the same model to
    train against. (The tokenizer part was added after a conversion with another transformers
    version named a different eos token.)"""
    import torch
    from safetensors import safe_open
    from transformers import AutoTokenizer

    from adapters.prompt import end_of_turn_id

    h = hashlib.sha256()
    tok = AutoTokenizer.from_pretrained(str(folder))
    h.update(json.dumps([tok.chat_template, tok.bos_token, tok.eos_token, tok.pad_token, end_of_turn_id(tok)]).encode())
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in sorted(st.keys()):
                t = st.get_tensor(k).contiguous()
                h.update(f"{k}|{t.dtype}|{tuple(t.shape)}".encode())
                h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _encode_shard(k: int, names: list[str], audio: Path, out: Path) -> dict[str, list[int]]:
    index: dict[str, list[int]] = {}
    target = out / f"shard{k:02d}.ogg"
    proc = subprocess.Popen(["ffmpeg", "-loglevel", "error", "-y", "-f", "s16le", "-ar", str(RATE), "-ac", "1", "-i", "-",
                             "-c:a", "libopus", "-b:a", "12k", "-application", "voip", "-compression_level", "5", str(target)],
                            stdin=subprocess.PIPE)
    assert proc.stdin is not None
    pos = 0
    for n in names:
        with wave.open(str(audio / n)) as w:
            if (w.getnchannels(), w.getsampwidth(), w.getframerate()) != (1, 2, RATE):
                raise ValueError(f"{n}: expected 16 kHz mono 16-bit PCM")
            pcm = w.readframes(w.getnframes())
        proc.stdin.write(pcm)
        index[n] = [k, pos, len(pcm) // 2]
        pos += len(pcm) // 2
    proc.stdin.close()
    if proc.wait() != 0:
        raise RuntimeError(f"ffmpeg failed on shard {k}")
    print(f"shard {k}: {len(names)} clips, {pos / RATE / 3600:.2f} h", file=sys.stderr, flush=True)
    return index


def pack(corpus: Path, manifests: list[Path], gguf: Path, teacher: Path, wheels: Path | None, out: Path, llm: Path) -> None:
    shards = out / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    if not (shards / "index.json").is_file():
        names = sorted(p.name for p in (corpus / "audio").glob("*.wav"))
        with ThreadPoolExecutor(2) as ex:
            parts = list(ex.map(lambda k: _encode_shard(k, names[k::SHARDS], corpus / "audio", shards), range(SHARDS)))
        (shards / "index.json").write_text(json.dumps({k: v for p in parts for k, v in p.items()}))
    for m in manifests:
        shutil.copy(m, out / m.name)
    shutil.copy(gguf, out / gguf.name)
    t_out = out / "teacher"
    t_out.mkdir(exist_ok=True)
    from safetensors.torch import load_file, save_file

    sd = load_file(str(teacher / "model.safetensors"))
    enc = {k: v for k, v in sd.items() if k.startswith(("encoder.", "model.encoder."))}
    lossy = [k for k, v in enc.items() if v.is_floating_point() and not v.half().float().equal(v.float())]
    if lossy:
        raise ValueError(f"teacher tensors not exact in fp16: {lossy[:3]}")
    save_file({k: v.half().contiguous() for k, v in enc.items()}, str(t_out / "model.safetensors"), metadata={"format": "pt"})
    for f in teacher.glob("*.json"):
        if f.name != "tokenizer.json":
            shutil.copy(f, t_out / f.name)
    if wheels is not None:
        shutil.copytree(wheels, out / "whl", dirs_exist_ok=True)
    tok_out = out / "llm_tokenizer"
    tok_out.mkdir(exist_ok=True)
    for name in LLM_TOKENIZER_FILES:
        shutil.copy(llm / name, tok_out / name)
    (out / "llm_digest.txt").write_text(weights_digest(llm) + "\n")
    print(json.dumps({"payload": str(out), "bytes": sum(f.stat().st_size for f in out.rglob("*") if f.is_file())}))


PIECE = ".piece-"  # a file larger than one part travels as NAME.piece-00, -01, ... plus NAME.pieces.json


def split_parts(payload: Path, out: Path, mib: int) -> list[Path]:
    """Hard-link (or copy) the payload's files into ``out/partNN/`` folders of at most ``mib`` MiB each,
    keeping each file's path below the payload: copying every part into one folder and running
    ``join_pieces`` on it rebuilds the payload. A file larger than a part (the 94 MB GGUF LLM) is cut into
    pieces of at most ``mib`` MiB, with its size and sha256 in ``NAME.pieces.json``."""
    limit = mib * 1024 * 1024
    # (path below the part, source: a payload file or the bytes to write, length, (offset, length) of a piece or None)
    entries: list[tuple[Path, Path | bytes, int, tuple[int, int] | None]] = []
    for f in sorted(x for x in payload.rglob("*") if x.is_file()):
        rel, size = f.relative_to(payload), f.stat().st_size
        if size <= limit:
            entries.append((rel, f, size, None))
            continue
        n = -(-size // limit)
        spans = [(k * limit, min(limit, size - k * limit)) for k in range(n)]
        entries += [(rel.with_name(f"{rel.name}{PIECE}{k:02d}"), f, span[1], span) for k, span in enumerate(spans)]
        info = json.dumps({"size": size, "sha256": hashlib.sha256(f.read_bytes()).hexdigest(), "pieces": n}).encode()
        entries.append((rel.with_name(rel.name + ".pieces.json"), info, len(info), None))
    entries.sort(key=lambda e: (-e[2], str(e[0])))
    used: list[int] = []
    bins: list[list[tuple[Path, Path | bytes, int, tuple[int, int] | None]]] = []
    for e in entries:  # first fit, largest first
        i = next((k for k, u in enumerate(used) if u + e[2] <= limit), len(bins))
        if i == len(bins):
            used.append(0)
            bins.append([])
        used[i] += e[2]
        bins[i].append(e)
    if out.exists():
        shutil.rmtree(out)
    parts = []
    for k, members in enumerate(bins):
        part = out / f"part{k:02d}"
        for rel, src, _, span in members:
            dst = part / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(src, bytes):
                dst.write_bytes(src)
            elif span is not None:
                with src.open("rb") as r:
                    r.seek(span[0])
                    dst.write_bytes(r.read(span[1]))
            else:
                try:
                    dst.hardlink_to(src)
                except OSError:
                    shutil.copy2(src, dst)
        parts.append(part)
    print(json.dumps({"parts": [str(p) for p in parts], "mib": [round(u / 2**20, 1) for u in used]}))
    return parts


def join_pieces(folder: Path) -> list[Path]:
    """Rebuild every file ``split_parts`` cut into pieces, in place; checks size and sha256 and names a
    missing piece (a part not carried). Idempotent: a file already joined is left as it is."""
    joined = []
    for sidecar in sorted(folder.rglob("*.pieces.json")):
        info = json.loads(sidecar.read_text())
        target = sidecar.with_name(sidecar.name.removesuffix(".pieces.json"))
        pieces = [target.with_name(f"{target.name}{PIECE}{k:02d}") for k in range(info["pieces"])]
        if not any(p.exists() for p in pieces) and target.is_file() and target.stat().st_size == info["size"]:
            continue
        missing = [p.name for p in pieces if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{target}: pieces {missing} are missing: copy every part into {folder}")
        tmp = target.with_name(target.name + ".joining")
        h = hashlib.sha256()
        with tmp.open("wb") as w:
            for p in pieces:
                data = p.read_bytes()
                h.update(data)
                w.write(data)
        if tmp.stat().st_size != info["size"] or h.hexdigest() != info["sha256"]:
            tmp.unlink()
            raise ValueError(f"{target}: the joined pieces differ from the packed file (size or sha256)")
        tmp.rename(target)
        for p in pieces:
            p.unlink()
        joined.append(target)
    return joined


def _decode_shard(args: tuple[Path, int, list[tuple[str, int, int]], Path]) -> int:
    import soundfile as sf

    shard, _, clips, audio = args
    x, sr = sf.read(str(shard), dtype="float32")
    if sr != RATE:
        raise ValueError(f"{shard}: {sr} Hz")
    for name, start, n in clips:
        seg = x[start : start + n]
        if len(seg) < n:
            seg = np.pad(seg, (0, n - len(seg)))
        with wave.open(str(audio / name), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(RATE)
            w.writeframes(np.clip(np.round(seg * 32768.0), -32768, 32767).astype("<i2").tobytes())
    return len(clips)


def unpack(payload: Path, out: Path) -> None:
    """Shards -> ``out/corpus/audio/*.wav`` (same names and lengths as the source clips) + manifests."""
    index = json.loads((payload / "shards" / "index.json").read_text())
    audio = out / "corpus" / "audio"
    audio.mkdir(parents=True, exist_ok=True)
    per: dict[int, list[tuple[str, int, int]]] = {}
    for name, (k, start, n) in index.items():
        per.setdefault(k, []).append((name, start, n))
    jobs = [(payload / "shards" / f"shard{k:02d}.ogg", k, clips, audio) for k, clips in sorted(per.items())]
    with ProcessPoolExecutor(len(jobs)) as ex:
        done = sum(ex.map(_decode_shard, jobs))
    for m in payload.glob("*.jsonl"):
        shutil.copy(m, out / "corpus" / m.name)
    print(json.dumps({"clips": done, "corpus": str(out / "corpus")}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack")
    a.add_argument("--corpus", type=Path, required=True)
    a.add_argument("--manifest", type=Path, action="append", required=True, help="manifests to carry (repeat)")
    a.add_argument("--gguf", type=Path, required=True)
    a.add_argument("--llm", type=Path, required=True, help="this machine's converted LLM folder (for the digest)")
    a.add_argument("--teacher", type=Path, required=True)
    a.add_argument("--wheels", type=Path)
    a.add_argument("--out", type=Path, required=True)
    b = sub.add_parser("unpack")
    b.add_argument("--payload", type=Path, required=True)
    b.add_argument("--out", type=Path, required=True)
    d = sub.add_parser("parts")
    d.add_argument("--payload", type=Path, required=True)
    d.add_argument("--out", type=Path, required=True)
    d.add_argument("--mib", type=int, default=44, help="the most one part (one device call's carry) may hold")
    e = sub.add_parser("join", help="there: rebuild the files parts cut into pieces, after copying every part in")
    e.add_argument("--payload", type=Path, required=True)
    c = sub.add_parser("digest")
    c.add_argument("folder", type=Path)
    args = p.parse_args()
    if args.cmd == "pack":
        pack(args.corpus, args.manifest, args.gguf, args.teacher, args.wheels, args.out, args.llm)
    elif args.cmd == "parts":
        split_parts(args.payload, args.out, args.mib)
    elif args.cmd == "join":
        print(json.dumps({"joined": [str(f) for f in join_pieces(args.payload)]}))
    elif args.cmd == "unpack":
        unpack(args.payload, args.out)
    else:
        print(weights_digest(args.folder))


if __name__ == "__main__":
    main()
