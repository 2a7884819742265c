"""The training pipeline's helpers in bench/: what a GPU lease is carried (payload parts) and which rows
the teacher hears (the hearable manifest). Both decide what a long run trains on, so they are checked
on real files rather than trusted."""

from __future__ import annotations

import filecmp
import json
import shutil
from pathlib import Path

import pytest

from adapters.training.data import ManifestRow
from bench.gpu_payload import join_pieces, split_parts
from bench.qa_rows import hearable, with_qa_rows

MIB = 1024 * 1024


def test_payload_parts_fit_one_call_each_and_rebuild_the_payload(tmp_path: Path) -> None:
    """Every part is at most --mib; copying all parts into one folder gives the payload back, file for file."""
    payload = tmp_path / "payload"
    sizes = {"shards/shard00.ogg": 0.7, "shards/shard01.ogg": 0.6, "shards/index.json": 0.01, "teacher/model.safetensors": 0.45,
             "train_qa.jsonl": 0.3, "whl/a.whl": 0.2, "llm_digest.txt": 0.0001}
    for i, (name, mib) in enumerate(sizes.items()):
        f = payload / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(bytes([i]) * int(mib * MIB))
    parts = split_parts(payload, tmp_path / "parts", 1)
    assert len(parts) == 3  # 2.26 MiB in parts of 1 MiB: first fit, largest first
    rebuilt = tmp_path / "rebuilt"
    seen: list[str] = []
    for part in parts:
        files = [f for f in part.rglob("*") if f.is_file()]
        assert sum(f.stat().st_size for f in files) <= MIB
        for f in files:
            rel = f.relative_to(part)
            seen.append(str(rel))
            (rebuilt / rel).parent.mkdir(parents=True, exist_ok=True)
            (rebuilt / rel).write_bytes(f.read_bytes())
    assert sorted(seen) == sorted(sizes)  # each file in exactly one part
    assert all(filecmp.cmp(payload / n, rebuilt / n, shallow=False) for n in sizes)



def test_a_file_larger_than_a_part_travels_in_pieces_and_joins_back(tmp_path: Path) -> None:
    """The GGUF LLM (94 MB) is larger than one call's carry: it is cut into pieces that fit, and
    ``join_pieces`` on the folder the parts were copied into rebuilds it byte for byte; a part left
    behind is named, a corrupted piece is caught by the checksum, and joining twice changes nothing."""
    import random

    payload = tmp_path / "payload"
    (payload / "teacher").mkdir(parents=True)
    big = random.Random(0).randbytes(int(2.5 * MIB))
    (payload / "llm.gguf").write_bytes(big)
    (payload / "teacher" / "model.safetensors").write_bytes(b"t" * int(0.6 * MIB))
    parts = split_parts(payload, tmp_path / "parts", 1)
    for part in parts:
        assert sum(f.stat().st_size for f in part.rglob("*") if f.is_file()) <= MIB
    # largest first: piece 00 (1 MiB), piece 01 (1 MiB), the teacher (0.6) with the sidecar, piece 02 (0.5)
    assert [sorted(f.name for f in part.rglob("*") if f.is_file()) for part in parts] == [
        ["llm.gguf.piece-00"], ["llm.gguf.piece-01"], ["llm.gguf.pieces.json", "model.safetensors"], ["llm.gguf.piece-02"]]
    there = tmp_path / "there"
    for part in parts[:-1]:  # one call's part left behind
        shutil.copytree(part, there, dirs_exist_ok=True)
    with pytest.raises(FileNotFoundError, match="missing: copy every part"):
        join_pieces(there)
    shutil.copytree(parts[-1], there, dirs_exist_ok=True)
    assert join_pieces(there) == [there / "llm.gguf"]
    assert (there / "llm.gguf").read_bytes() == big and not list(there.glob("llm.gguf.piece-*"))
    assert join_pieces(there) == [] and (there / "llm.gguf").read_bytes() == big
    shutil.rmtree(there)
    for part in parts:
        shutil.copytree(part, there, dirs_exist_ok=True)
    piece = there / "llm.gguf.piece-01"
    piece.write_bytes(b"\0" + piece.read_bytes()[1:])
    with pytest.raises(ValueError, match="sha256"):
        join_pieces(there)


def test_hearable_keeps_the_rows_whose_voice_the_teacher_hears() -> None:
    """Piper, flite, Festival, RHVoice and Pico voices are named engine:voice; espeak-ng's are not."""
    voices = ["piper:en_US-joe-medium", "flite:kal", "en-us+f3", "rhvoice:clb", "en-gb-scotland", "pico:en-GB", None]
    rows = [ManifestRow.model_validate({"audio": f"audio/train-{i:06d}.wav", "task": "transcribe", "text": f"line {i}",
                                        **({"voice": v} if v else {})}) for i, v in enumerate(voices)]
    kept = hearable(rows)
    assert [r.voice for r in kept] == ["piper:en_US-joe-medium", "flite:kal", "rhvoice:clb", "pico:en-GB"]
    # on a manifest that already has its qa rows, --wiki 0 adds nothing: --hearable then only filters
    asked = with_qa_rows(rows, wiki=len(rows), seed=0)
    assert with_qa_rows(asked, wiki=0, seed=0) == asked
    assert json.loads(kept[0].model_dump_json())["voice"] == "piper:en_US-joe-medium"


@pytest.mark.parametrize("recipe", sorted(p.name for p in (Path(__file__).parent.parent / "bench").glob("*.yaml")))
def test_every_training_recipe_in_bench_is_a_valid_config(recipe: str) -> None:
    """A recipe is read hours into a plan (on a GPU lease, say): a renamed or mistyped setting must fail here first."""
    from adapters.training.config import load_train_config

    path = Path(__file__).parent.parent / "bench" / recipe
    cfg = load_train_config(path, {"student": "s", "teacher": "t", "manifest": "m", "output": "o"})
    assert cfg.steps > 0 and cfg.batch_size > 0
    with pytest.raises(ValueError, match="no_such_setting"):
        load_train_config(path, {"student": "s", "teacher": "t", "manifest": "m", "output": "o", "no_such_setting": 1})


def test_rebuilt_rows_take_their_answers_from_the_manifest_they_replace(tmp_path: Path) -> None:
    """A corpus rebuilt with new voices but the same lines needs no vLLM run: each question answered in
    the old manifest keeps its answer (the model folder here does not exist, so vLLM would fail), the
    rows keep their new voices, and the same line asked with another prompt is a new question."""
    import numpy as np

    from adapters.training.data import read_manifest, text_question, write_manifest
    from adapters.training.responses import fill_responses, known_answers
    from adapters.training.voices import write_wav

    texts = ["what is the capital of france", "how many legs does a spider have"]
    (tmp_path / "audio").mkdir()
    for i in range(len(texts)):
        write_wav(tmp_path / "audio" / f"train-{i:06d}.wav", np.zeros(1600, dtype=np.float32), 16000)

    def rows(voice: str, answered: bool) -> list[ManifestRow]:
        out = []
        for i, t in enumerate(texts):
            base = {"audio": f"audio/train-{i:06d}.wav", "text": t, "voice": voice}
            out.append(ManifestRow.model_validate({**base, "task": "transcribe"}))
            out.append(ManifestRow.model_validate({**base, "task": "qa", **({"response": f"answer {i}"} if answered else {})}))
        return out

    old, new = tmp_path / "train_qa.jsonl", tmp_path / "train_qa.next.jsonl"
    write_manifest(old, rows("en-us+m3", answered=True))
    write_manifest(new, rows("rhvoice:clb", answered=False))
    assert fill_responses(new, tmp_path / "no-such-model", answers_from=[old]) == 2
    filled = read_manifest(new)
    assert [(r.voice, r.response) for r in filled if r.task == "qa"] == [("rhvoice:clb", "answer 0"), ("rhvoice:clb", "answer 1")]
    asked_otherwise = ManifestRow.model_validate({"audio": "audio/train-000000.wav", "task": "qa", "text": texts[0],
                                                  "prompt": "Answer in one word."})
    assert text_question(asked_otherwise) not in known_answers([old])
