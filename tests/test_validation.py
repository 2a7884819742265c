"""Every adapter validation rule, each with a deliberately broken adapter (in-process, fast),
plus the ``aura adapter validate|inspect`` exit codes (the same validation as the server)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapter_helpers import DELETE, copy_adapter, edit_json, rehash
from adapters.adapter import AUDIO_WEIGHTS, AURA_CONFIG, LORA_CONFIG, LORA_WEIGHTS, load_adapter
from adapters.base_model import read_base_model
from adapters.validate import AdapterValidationError, validate_adapter

ROOT = Path(__file__).resolve().parent.parent


def _weights(adapter: Path, name: str, change) -> None:
    tensors = load_file(str(adapter / name))
    change(tensors)
    save_file(tensors, str(adapter / name))
    rehash(adapter)


def _first(tensors: dict, part: str) -> str:
    return next(k for k in sorted(tensors) if part in k)


def _rename(tensors: dict, old: str, new: str) -> None:
    tensors[new] = tensors.pop(old)


Q0 = "model.layers.0.self_attn.q_proj"

# (rule id, how to break it, expected code, file the error must name)
BREAKERS = {
    "not_a_directory": (lambda a: None, "not_found", None),
    "missing_aura_config": (lambda a: (a / AURA_CONFIG).unlink(), "missing_file", AURA_CONFIG),
    "missing_lora_config": (lambda a: (a / LORA_CONFIG).unlink(), "missing_file", LORA_CONFIG),
    "missing_lora_weights": (lambda a: (a / LORA_WEIGHTS).unlink(), "missing_file", LORA_WEIGHTS),
    "missing_audio_weights": (lambda a: (a / AUDIO_WEIGHTS).unlink(), "missing_file", AUDIO_WEIGHTS),
    "pickle_file": (lambda a: (a / "adapter_model.bin").write_bytes(b"\x80\x04K\x01."), "pickle_weights",
                    "adapter_model.bin"),
    "nested_pickle": (lambda a: ((a / "extra").mkdir(), (a / "extra" / "evil.pt").write_bytes(b"x")),
                      "pickle_weights", "extra/evil.pt"),
    "aura_config_not_json": (lambda a: (a / AURA_CONFIG).write_text("{nope"), "bad_config", AURA_CONFIG),
    "format_version": (lambda a: edit_json(a, AURA_CONFIG, format_version=99), "unsupported_version", AURA_CONFIG),
    "aura_config_schema": (lambda a: edit_json(a, AURA_CONFIG, base_model=DELETE), "bad_config", AURA_CONFIG),
    "missing_checksum": (lambda a: edit_json(a, AURA_CONFIG, fix_checksums=False, files={}), "missing_checksum",
                         AURA_CONFIG),
    "checksum_mismatch": (lambda a: (a / LORA_CONFIG).write_text((a / LORA_CONFIG).read_text() + "\n"),
                          "checksum_mismatch", LORA_CONFIG),
    "unsupported_features": (lambda a: edit_json(a, AURA_CONFIG, features__sample_rate=8000), "unsupported_features",
                             AURA_CONFIG),
    "n_mels_disagree": (lambda a: edit_json(a, AURA_CONFIG, features__n_mels=128), "bad_config", AURA_CONFIG),
    "audio_hidden_size": (lambda a: edit_json(a, AURA_CONFIG, audio_layer__hidden_size=96), "hidden_size_mismatch",
                          AURA_CONFIG),
    "base_hidden_size": (lambda a: edit_json(a, AURA_CONFIG, audio_layer__hidden_size=256,
                                             base_model__hidden_size=256), "hidden_size_mismatch", AURA_CONFIG),
    "base_fingerprint": (lambda a: edit_json(a, AURA_CONFIG, base_model__fingerprint="sha256:" + "0" * 32),
                         "base_model_mismatch", AURA_CONFIG),
    "lora_config_not_json": (lambda a: ((a / LORA_CONFIG).write_text("[[["), rehash(a)), "bad_lora_config",
                             LORA_CONFIG),
    "peft_type": (lambda a: edit_json(a, LORA_CONFIG, peft_type="IA3"), "bad_lora_config", LORA_CONFIG),
    "rank_not_int": (lambda a: edit_json(a, LORA_CONFIG, r="eight"), "bad_lora_config", LORA_CONFIG),
    "rank_too_large": (lambda a: None, "rank_too_large", LORA_CONFIG),  # validated with max_lora_rank=4
    "lora_alpha": (lambda a: edit_json(a, LORA_CONFIG, lora_alpha=-1), "bad_lora_config", LORA_CONFIG),
    "bias": (lambda a: edit_json(a, LORA_CONFIG, bias="all"), "bad_lora_config", LORA_CONFIG),
    "layers_to_transform": (lambda a: edit_json(a, LORA_CONFIG, layers_to_transform=[0, 7]), "bad_lora_config",
                            LORA_CONFIG),
    "dora": (lambda a: edit_json(a, LORA_CONFIG, use_dora=True), "bad_lora_config", LORA_CONFIG),
    "modules_to_save": (lambda a: edit_json(a, LORA_CONFIG, modules_to_save=["lm_head"]), "bad_lora_config",
                        LORA_CONFIG),
    # PEFT's per-module rank / alpha: keys are read as regular expressions by engines, so only module names pass
    "rank_pattern_regex": (lambda a: edit_json(a, LORA_CONFIG, rank_pattern={"(a+)+$": 8}), "bad_lora_config",
                           LORA_CONFIG),
    "rank_pattern_value": (lambda a: edit_json(a, LORA_CONFIG, rank_pattern={Q0: 0}), "bad_lora_config", LORA_CONFIG),
    "rank_pattern_keys": (lambda a: edit_json(a, LORA_CONFIG, rank_pattern={f"m{i}": 8 for i in range(4097)}),
                          "bad_lora_config", LORA_CONFIG),
    "alpha_pattern_value": (lambda a: edit_json(a, LORA_CONFIG, alpha_pattern={Q0: -1.0}), "bad_lora_config",
                            LORA_CONFIG),
    "alpha_pattern_infinite": (lambda a: ((a / LORA_CONFIG).write_text((a / LORA_CONFIG).read_text().replace(
        '"alpha_pattern": {}', f'"alpha_pattern": {{"{Q0}": Infinity}}')), rehash(a)), "bad_lora_config", LORA_CONFIG),
    "rank_pattern_shape": (lambda a: edit_json(a, LORA_CONFIG, rank_pattern={Q0: 4}), "bad_lora_weights", LORA_WEIGHTS),
    "no_targets": (lambda a: edit_json(a, LORA_CONFIG, target_modules=[]), "bad_lora_config", LORA_CONFIG),
    "unknown_target": (lambda a: edit_json(a, LORA_CONFIG, target_modules=["q_proj", "qkv_fused"]),
                       "unknown_target_modules", LORA_CONFIG),
    "weights_not_safetensors": (lambda a: ((a / LORA_WEIGHTS).write_bytes(b"\x80\x04garbage" * 10), rehash(a)),
                                "unreadable_weights", LORA_WEIGHTS),
    "weights_empty": (lambda a: _weights(a, LORA_WEIGHTS, lambda t: t.clear() or t.update()), "bad_lora_weights",
                      LORA_WEIGHTS),
    "tensor_name": (lambda a: _weights(a, LORA_WEIGHTS, lambda t: _rename(t, _first(t, "lora_A"), "weird.tensor")),
                    "bad_lora_weights", LORA_WEIGHTS),
    "tensor_layer_out_of_range": (
        lambda a: _weights(a, LORA_WEIGHTS, lambda t: _rename(t, _first(t, "layers.1."), _first(t, "layers.1.")
                                                                  .replace("layers.1.", "layers.9."))),
        "bad_lora_weights", LORA_WEIGHTS),
    "tensor_module_not_targeted": (lambda a: edit_json(a, LORA_CONFIG, target_modules=["q_proj"]),
                                   "bad_lora_weights", LORA_WEIGHTS),
    "tensor_dtype": (lambda a: _weights(a, LORA_WEIGHTS, lambda t: t.update(
        {_first(t, "lora_A"): t[_first(t, "lora_A")].to(torch.int32)})), "bad_lora_weights", LORA_WEIGHTS),
    "tensor_rank_shape": (lambda a: _weights(a, LORA_WEIGHTS, lambda t: t.update(
        {_first(t, "lora_A"): t[_first(t, "lora_A")][:4].contiguous()})), "bad_lora_weights", LORA_WEIGHTS),
    "tensor_base_shape": (lambda a: _weights(a, LORA_WEIGHTS, lambda t: t.update(
        {_first(t, "lora_A"): t[_first(t, "lora_A")][:, :64].contiguous()})), "bad_lora_weights", LORA_WEIGHTS),
    "lora_a_without_b": (lambda a: _weights(a, LORA_WEIGHTS, lambda t: t.pop(_first(t, "lora_B"))),
                         "bad_lora_weights", LORA_WEIGHTS),
    "audio_tensor_missing": (lambda a: _weights(a, AUDIO_WEIGHTS, lambda t: t.pop(sorted(t)[0])),
                             "bad_audio_weights", AUDIO_WEIGHTS),
    "audio_tensor_shape": (lambda a: _weights(a, AUDIO_WEIGHTS, lambda t: t.update(
        {sorted(t)[0]: torch.zeros(3, 3)})), "bad_audio_weights", AUDIO_WEIGHTS),
    "audio_tensor_dtype": (lambda a: _weights(a, AUDIO_WEIGHTS, lambda t: t.update(
        {sorted(t)[0]: t[sorted(t)[0]].to(torch.int64)})), "bad_audio_weights", AUDIO_WEIGHTS),
}


@pytest.fixture(scope="module")
def base(tiny):
    return read_base_model(tiny.llm)


def test_a_good_adapter_passes(tiny, base):
    config = validate_adapter(tiny.adapters["alpha"], base=base, max_lora_rank=64)
    assert config.base_model.fingerprint == base.fingerprint


def test_a_per_block_rank_is_validated_module_by_module(tiny, base):
    """beta gives block 0 rank 16 (rank_pattern) over r = 8: each module's weights must have its own rank, and the
    server's max_lora_rank must cover the largest, not just r."""
    validate_adapter(tiny.adapters["beta"], base=base, max_lora_rank=16)
    assert load_adapter(tiny.adapters["beta"]).lora_rank == 16
    with pytest.raises(AdapterValidationError) as info:
        validate_adapter(tiny.adapters["beta"], base=base, max_lora_rank=12)
    assert info.value.code == "rank_too_large" and "16" in info.value.message


def test_a_pattern_key_that_is_a_regular_expression_is_refused_unread(tiny, base, tmp_path):
    adapter = copy_adapter(tiny.adapters["alpha"], tmp_path / "redos")
    edit_json(adapter, LORA_CONFIG, rank_pattern={"(" * 20 + "a+" + ")+" * 20 + "$": 8})
    with pytest.raises(AdapterValidationError, match="module name"):
        validate_adapter(adapter, base=base, max_lora_rank=64)
    BREAKERS["alpha_pattern_infinite"][0](copy_adapter(tiny.adapters["alpha"], tmp_path / "inf"))
    with pytest.raises(AdapterValidationError, match="alpha_pattern' value .* must be a positive number, got inf"):
        validate_adapter(tmp_path / "inf", base=base, max_lora_rank=64)


@pytest.mark.parametrize("rule", sorted(BREAKERS))
def test_each_rule_rejects_a_broken_adapter(rule, tiny, base, tmp_path):
    breaker, code, file = BREAKERS[rule]
    adapter = tmp_path / "broken"
    if rule == "not_a_directory":
        adapter.write_text("not a folder")
    else:
        copy_adapter(tiny.adapters["alpha"], adapter)
        breaker(adapter)
    with pytest.raises(AdapterValidationError) as info:
        validate_adapter(adapter, base=base, max_lora_rank=4 if rule == "rank_too_large" else 64)
    err = info.value
    assert err.code == code, f"{rule}: {err.code}: {err}"
    assert err.file == file, f"{rule}: names {err.file}, expected {file}"
    assert len(err.message) > 20  # says what is wrong and how to fix it


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.cli", "adapter", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_cli_validate_and_inspect_exit_codes(tiny, tmp_path):
    good = _cli("validate", str(tiny.adapters["alpha"]), "--model", str(tiny.llm))
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout)["valid"] is True

    broken = copy_adapter(tiny.adapters["alpha"], tmp_path / "broken")
    edit_json(broken, LORA_CONFIG, r=128)
    bad = _cli("validate", str(broken), "--model", str(tiny.llm), "--max-lora-rank", "64")
    assert bad.returncode == 2
    out = json.loads(bad.stdout)
    assert out["valid"] is False and out["code"] == "rank_too_large" and out["file"] == LORA_CONFIG

    inspected = _cli("inspect", str(tiny.adapters["alpha"]))
    assert inspected.returncode == 0, inspected.stderr
    assert json.loads(inspected.stdout)["lora"]["r"] == 8
    missing = _cli("inspect", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "not" in missing.stderr.lower()


def test_save_adapter_replaces_whole_or_not_at_all(tiny, base, tmp_path):
    """A save over an existing adapter publishes the new folder in one rename; a save that fails
    half-way leaves the old adapter as it was and no hidden leftovers beside it."""
    from adapters.adapter import save_adapter

    alpha, beta = load_adapter(tiny.adapters["alpha"]), load_adapter(tiny.adapters["beta"])
    out = tmp_path / "out"
    save_adapter(out, config=alpha.config, audio_layer=alpha.audio_layer, lora_dir=tiny.adapters["alpha"])
    validate_adapter(out, base=base, max_lora_rank=64)
    save_adapter(out, config=beta.config, audio_layer=beta.audio_layer, lora_dir=tiny.adapters["beta"])
    validate_adapter(out, base=base, max_lora_rank=64)
    assert (out / LORA_WEIGHTS).read_bytes() == (tiny.adapters["beta"] / LORA_WEIGHTS).read_bytes()
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    with pytest.raises(FileNotFoundError):
        save_adapter(out, config=alpha.config, audio_layer=alpha.audio_layer, lora_dir=tmp_path / "missing")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
