"""Demo-model provisioning (adapters/provision): CTranslate2 Whisper and GGUF SmolLM2 into Hugging Face folders.

The real conversions run once per session (about 35 s on 2 cores) into a pytest temp dir, or
are reused from ``$AURA_HOME`` when a finished conversion is already there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from adapters.atomic_dir import atomic_dir
from adapters.provision.ct2_reader import read_ct2_file, read_ct2_model
from adapters.provision.publish import PROVENANCE_FILE
from adapters.provision.whisper_weights import (
    CT2_WHISPER_OPTION_NAMES,
    hf_to_ct2_whisper_names,
    whisper_ct2_to_hf_names,
)
from adapters.provision.demo import (
    DEMO_LLM_NAME,
    DemoModels,
    demo_models_dir,
    demo_teacher_source,
    prepare_demo_models,
)

# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory: pytest.TempPathFactory) -> DemoModels:
    """Converted demo folders: reuse $AURA_HOME's finished ones, else convert into a tmp home."""
    env_home = os.environ.get("AURA_HOME")
    if env_home:
        models = demo_models_dir(Path(env_home))
        llm, teacher = models / DEMO_LLM_NAME, models / "whisper-tiny.en"
        if (llm / PROVENANCE_FILE).is_file() and (teacher / PROVENANCE_FILE).is_file():
            return DemoModels(llm=llm, teacher=teacher)
    home = tmp_path_factory.mktemp("aura_home")
    return prepare_demo_models(home, progress=False)


@pytest.fixture(scope="session")
def ct2_tensors() -> dict[str, np.ndarray]:
    return read_ct2_model(demo_teacher_source() / "model.bin")


# --------------------------------------------------------------------------------------------
# CTranslate2 reader and name map
# --------------------------------------------------------------------------------------------


def test_ct2_file_layout() -> None:
    """The header and the alias table are what the reader documents (a format check)."""
    raw = read_ct2_file(demo_teacher_source() / "model.bin")
    assert (raw.binary_version, raw.spec_name, raw.spec_revision) == (6, "WhisperSpec", 3)
    assert len(raw.variables) == 148
    assert raw.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    assert raw.variables["encoder/conv1/weight"].shape == (384, 80, 3)
    assert raw.variables["encoder/conv1/weight"].dtype == np.float16
    assert int(raw.variables["decoder/num_heads"]) == 6


def test_ct2_names_round_trip_to_whisper(ct2_tensors: dict[str, np.ndarray]) -> None:
    """Every CTranslate2 tensor maps to Whisper parameters of matching shape, and back.

    Exceptions, on purpose: rank-0 CTranslate2 variables are options (heads, activation,
    pre-norm...) that become config, not weights; the zero k-projection bias slices of the
    fused qkv / kv biases have no Whisper counterpart (Whisper's k_proj has no bias); the
    decoder/projection alias and proj_out are the same tied tensor on both sides.
    """
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    options = {n for n, a in ct2_tensors.items() if a.ndim == 0}
    assert options == set(CT2_WHISPER_OPTION_NAMES)
    weights = {n: a for n, a in ct2_tensors.items() if a.ndim > 0}

    mapping = whisper_ct2_to_hf_names(4, 4)
    assert set(mapping) == set(weights), "CTranslate2 tensors left unmapped, or map entries with no tensor"

    config = WhisperConfig(
        vocab_size=51864, num_mel_bins=80, d_model=384, encoder_layers=4, decoder_layers=4,
        encoder_attention_heads=6, decoder_attention_heads=6, encoder_ffn_dim=1536, decoder_ffn_dim=1536,
    )
    with torch.device("meta"):
        hf_shapes = {k: tuple(v.shape) for k, v in WhisperForConditionalGeneration(config).state_dict().items()}

    produced = [h for parts in mapping.values() for h in parts if h is not None]
    assert len(produced) == len(set(produced)), "two CTranslate2 slices claim one Whisper parameter"
    assert set(produced) == set(hf_shapes), (
        f"unmapped Whisper params: {sorted(set(hf_shapes) - set(produced))}; "
        f"unknown: {sorted(set(produced) - set(hf_shapes))}"
    )
    dropped = sorted(n for n, parts in mapping.items() if None in parts)
    assert dropped and all(re.search(r"(self_attention/linear_0|attention/linear_1)/bias$", n) for n in dropped)

    for ct2_name, parts in mapping.items():
        shape = weights[ct2_name].shape
        block = (shape[0] // len(parts), *shape[1:])
        assert shape[0] % len(parts) == 0
        for hf_name in parts:
            if hf_name is not None:
                assert hf_shapes[hf_name] == block, (ct2_name, hf_name, shape)
                if hf_name.endswith("k_proj.bias"):
                    pytest.fail("Whisper has no k_proj bias")

    reverse = hf_to_ct2_whisper_names(4, 4)
    assert set(reverse) == set(hf_shapes)
    for hf_name, (ct2_name, index, count) in reverse.items():
        assert mapping[ct2_name][index] == hf_name and len(mapping[ct2_name]) == count

    for ct2_name, parts in mapping.items():  # the slices Whisper lacks really are zero
        for index, hf_name in enumerate(parts):
            if hf_name is None:
                assert not np.any(np.array_split(weights[ct2_name], len(parts))[index])


def _ct2_string(text: str) -> bytes:
    raw = text.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def test_ct2_reader_dtypes_quantization_and_aliases(tmp_path: Path) -> None:
    """A synthetic file exercises what the demo file lacks: fp32, bf16, int8 + scale, errors."""
    w = np.array([[1.0, -2.0], [0.5, 0.25]], dtype=np.float32)
    scale = (127.0 / np.abs(w).max(axis=1)).astype(np.float32)
    q = np.round(w * scale[:, None]).astype(np.int8)
    bf16 = torch.tensor([1.5, -3.0]).to(torch.bfloat16).view(torch.int16).numpy()

    def var(name: str, arr: np.ndarray, type_id: int) -> bytes:
        head = _ct2_string(name) + struct.pack("<B", arr.ndim) + b"".join(struct.pack("<I", d) for d in arr.shape)
        return head + struct.pack("<BI", type_id, arr.nbytes) + arr.tobytes()

    body = [var("a/weight", q, 1), var("a/weight_scale", scale, 0), var("b", bf16, 5),
            var("c", np.array([7, 8], dtype=np.float32), 0), var("opt", np.array(3, dtype=np.int8), 1)]
    blob = struct.pack("<I", 6) + _ct2_string("TestSpec") + struct.pack("<II", 1, len(body)) + b"".join(body)
    blob += struct.pack("<I", 1) + _ct2_string("d") + _ct2_string("c")
    path = tmp_path / "model.bin"
    path.write_bytes(blob)

    out = read_ct2_model(path)
    assert set(out) == {"a/weight", "b", "c", "d", "opt"}
    np.testing.assert_allclose(out["a/weight"], w, atol=0.01)
    np.testing.assert_array_equal(out["b"], [1.5, -3.0])
    assert out["d"] is out["c"] and int(out["opt"]) == 3

    path.write_bytes(blob + b"\0")
    with pytest.raises(ValueError, match="trailing"):
        read_ct2_file(path)
    path.write_bytes(blob[:-9])
    with pytest.raises(ValueError, match="truncated"):
        read_ct2_file(path)


# --------------------------------------------------------------------------------------------
# converted folders
# --------------------------------------------------------------------------------------------


def test_converted_folders_are_complete(demo_models: DemoModels) -> None:
    llm_config = json.loads((demo_models.llm / "config.json").read_text())
    assert not [k for k in llm_config if "quant" in k or "gguf" in k]
    assert llm_config["dtype"] == llm_config["torch_dtype"] == "bfloat16"
    assert llm_config["architectures"] == ["LlamaForCausalLM"]
    assert json.loads((demo_models.llm / "tokenizer_config.json").read_text())["chat_template"]
    for name in ("model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (demo_models.llm / name).is_file()

    teacher_config = json.loads((demo_models.teacher / "config.json").read_text())
    derived = {k: teacher_config[k] for k in ("d_model", "encoder_layers", "decoder_layers",
                                              "encoder_attention_heads", "num_mel_bins", "vocab_size")}
    assert derived == {"d_model": 384, "encoder_layers": 4, "decoder_layers": 4,
                       "encoder_attention_heads": 6, "num_mel_bins": 80, "vocab_size": 51864}
    generation = json.loads((demo_models.teacher / "generation_config.json").read_text())
    assert generation["decoder_start_token_id"] == 50257 and generation["eos_token_id"] == 50256
    assert generation["no_timestamps_token_id"] == 50362 and generation["is_multilingual"] is False
    assert generation["begin_suppress_tokens"] == [220, 50256] and len(generation["suppress_tokens"]) > 50
    assert not list(demo_models.llm.parent.glob(".*partial*")), "a temporary folder was left behind"


def test_whisper_weights_match_ct2(demo_models: DemoModels, ct2_tensors: dict[str, np.ndarray]) -> None:
    """Spot-check values (not just names): split qkv, embeddings, sinusoidal encoder positions."""
    from safetensors import safe_open

    with safe_open(demo_models.teacher / "model.safetensors", framework="pt") as fh:
        qkv = ct2_tensors["encoder/layer_2/self_attention/linear_0/weight"].astype(np.float32)
        np.testing.assert_array_equal(fh.get_tensor("model.encoder.layers.2.self_attn.v_proj.weight").numpy(), qkv[768:])
        kv = ct2_tensors["decoder/layer_1/attention/linear_1/weight"].astype(np.float32)
        np.testing.assert_array_equal(fh.get_tensor("model.decoder.layers.1.encoder_attn.k_proj.weight").numpy(), kv[:384])
        np.testing.assert_array_equal(
            fh.get_tensor("model.decoder.embed_tokens.weight").numpy(),
            ct2_tensors["decoder/embeddings/weight"].astype(np.float32),
        )
        positions = fh.get_tensor("model.encoder.embed_positions.weight")
    length, channels = positions.shape  # Whisper's sinusoids(1500, 384), stored rather than derived
    inv = torch.exp(-np.log(10000) / (channels // 2 - 1) * torch.arange(channels // 2))
    angles = torch.arange(length)[:, None] * inv[None, :]
    assert torch.allclose(positions, torch.cat([angles.sin(), angles.cos()], dim=1), atol=2e-3)


def _words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split()


def _wer(reference: str, hypothesis: str) -> float:
    ref, hyp = _words(reference), _words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1] / max(len(ref), 1)


def test_wer_helper() -> None:
    assert _wer("what is the capital", "What is the capital?") == 0.0
    assert _wer("a b c d", "a x c") == 0.5


@pytest.mark.skipif(not (shutil.which("espeak-ng") and shutil.which("ffmpeg")), reason="needs espeak-ng and ffmpeg")
def test_converted_whisper_transcribes_speech(demo_models: DemoModels, tmp_path: Path) -> None:
    import soundfile as sf
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    text = "what is the capital of france"
    wav, wav16 = tmp_path / "q.wav", tmp_path / "q16.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "140", "-w", str(wav), text], check=True, capture_output=True)
    # espeak-ng writes 22.05 kHz; Whisper wants 16 kHz mono (no torchaudio/scipy here: ffmpeg resamples).
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(wav), "-ac", "1", "-ar", "16000", str(wav16)],
                   check=True, capture_output=True)
    audio, rate = sf.read(wav16, dtype="float32")
    assert rate == 16000

    processor = WhisperProcessor.from_pretrained(demo_models.teacher)
    model = WhisperForConditionalGeneration.from_pretrained(demo_models.teacher).eval()
    features = processor(audio, sampling_rate=16000, return_tensors="pt").input_features
    with torch.inference_mode():
        ids = model.generate(features, max_new_tokens=48)
    transcript = processor.batch_decode(ids, skip_special_tokens=True)[0]
    assert _wer(text, transcript) <= 0.25, transcript


def test_converted_smollm2_answers(demo_models: DemoModels) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_models.llm)
    model = AutoModelForCausalLM.from_pretrained(demo_models.llm, dtype=torch.bfloat16).eval()
    assert getattr(model.config, "quantization_config", None) is None
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=24, do_sample=False)
    answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


# --------------------------------------------------------------------------------------------
# preparation logic (no real conversion: the converters are replaced)
# --------------------------------------------------------------------------------------------


def test_demo_models_dir_follows_aura_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AURA_HOME", str(tmp_path))
    assert demo_models_dir() == tmp_path / "models"
    monkeypatch.delenv("AURA_HOME")
    assert demo_models_dir() == Path.home() / ".cache" / "aura" / "models"
    assert demo_models_dir(tmp_path / "x") == tmp_path / "x" / "models"


def test_interrupted_conversion_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "models" / "m"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(target, overwrite=False, shared=True) as tmp:
            (tmp / "config.json").write_text("{}")
            raise RuntimeError("boom")
    assert not target.exists() and not list(target.parent.iterdir())

    with atomic_dir(target, overwrite=False, shared=True) as tmp:
        (tmp / "config.json").write_text("{}")
    assert (target / "config.json").is_file()
    with pytest.raises(FileExistsError):
        with atomic_dir(target, overwrite=False, shared=True):
            pass
    with atomic_dir(target, overwrite=True, shared=True) as tmp:
        (tmp / "new").write_text("x")
    assert sorted(p.name for p in target.iterdir()) == ["new"]
    assert [p.name for p in target.parent.iterdir()] == ["m"]


def test_prepare_demo_models_converts_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[str] = []

    def fake(kind: str, files: tuple[str, ...]):
        def run(src: Path, out: Path, *, dtype: torch.dtype, progress: bool, overwrite: bool) -> Path:
            calls.append(kind)
            with atomic_dir(out, overwrite=overwrite, shared=True) as tmp:
                for name in files:
                    (tmp / name).write_text("{}")
            return out
        return run

    import adapters.provision.demo as models

    monkeypatch.setattr(models, "convert_gguf_llm", fake("llm", models._LLM_FILES))
    monkeypatch.setattr(models, "convert_ct2_whisper", fake("teacher", models._TEACHER_FILES))
    first = prepare_demo_models(tmp_path, progress=False)
    assert first.llm == tmp_path / "models" / DEMO_LLM_NAME and first.teacher == tmp_path / "models" / "whisper-tiny.en"
    assert calls == ["llm", "teacher"]
    assert prepare_demo_models(tmp_path, progress=False) == first and calls == ["llm", "teacher"]
    (first.teacher / "model.safetensors").unlink()  # damaged by hand: rebuilt, not trusted
    prepare_demo_models(tmp_path, progress=False)
    assert calls == ["llm", "teacher", "teacher"]
    prepare_demo_models(tmp_path, force=True, progress=False)
    assert calls == ["llm", "teacher", "teacher", "llm", "teacher"]
