"""The single-adapter fast path (``aura serve --merge-adapter NAME``): the LoRA merged into the
base weights, LoRA off in the engine, the audio layer still in the server.

The parity test runs two real servers over HTTP on the same tiny fp32 model: the session's
LoRA server (alpha as a LoRA request) and a merged one (alpha in the weights), and asks both the
same spoken questions greedily.
"""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from safetensors.torch import load_file

from launch import start_server, stop_server
from test_serving_api import post_audio

MAX_TOKENS = 16


@pytest.fixture(scope="module")
def merged_server(tiny, tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("merged-home")
    args = ["--model", str(tiny.llm), "--dtype", "float32", "--max-num-seqs", "32", "--max-model-len", "1024",
            "--adapter", f"alpha={tiny.adapters['alpha']}", "--merge-adapter", "alpha"]
    srv = start_server(args, home, home / "server.log")
    srv.home = home
    yield srv
    stop_server(srv)


def test_merged_weights_equal_peft_merge_and_unload(tiny, tmp_path):
    """The merge arithmetic is PEFT's own (alpha / r scaling, every target module), and the folder
    is made once per (base, adapter) pair and keyed by both."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from adapters.merge import MERGED_WEIGHTS, merged_model_dir

    out = merged_model_dir(tiny.llm, tiny.adapters["alpha"], tmp_path / "merged")
    ours = load_file(str(out / MERGED_WEIGHTS))
    model = AutoModelForCausalLM.from_pretrained(str(tiny.llm), torch_dtype=torch.float32)
    theirs = PeftModel.from_pretrained(model, str(tiny.adapters["alpha"])).merge_and_unload().state_dict()
    base = load_file(str(next(tiny.llm.glob("*.safetensors"))))
    changed = [k for k in base if not torch.equal(base[k], ours[k])]
    assert len(changed) == 2 * 7  # two layers x q/k/v/o/gate/up/down: the LoRA really went in
    for k, v in ours.items():
        torch.testing.assert_close(v, theirs[k], rtol=0, atol=1e-6)
    assert merged_model_dir(tiny.llm, tiny.adapters["alpha"], tmp_path / "merged") == out  # reused
    assert merged_model_dir(tiny.llm, tiny.adapters["beta"], tmp_path / "merged") != out  # keyed by adapter
    assert not [p for p in (tmp_path / "merged").iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_merge_scales_each_module_as_peft_does(tiny, tmp_path):
    """beta gives block 0 another rank and scale (rank_pattern / alpha_pattern): the merge takes each module's own."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from adapters.merge import MERGED_WEIGHTS, merged_model_dir

    ours = load_file(str(merged_model_dir(tiny.llm, tiny.adapters["beta"], tmp_path / "merged") / MERGED_WEIGHTS))
    model = AutoModelForCausalLM.from_pretrained(str(tiny.llm), torch_dtype=torch.float32)
    theirs = PeftModel.from_pretrained(model, str(tiny.adapters["beta"])).merge_and_unload().state_dict()
    for k, v in ours.items():
        torch.testing.assert_close(v, theirs[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize("clip", ["capital", "spider", "sky", "water"])
def test_merged_engine_gives_the_lora_engines_tokens(server, merged_server, speech, clip):
    lora = post_audio(server.url, speech[clip], adapter="alpha", max_tokens=MAX_TOKENS, return_token_ids=True)
    merged = post_audio(merged_server.url, speech[clip], adapter="alpha", max_tokens=MAX_TOKENS,
                        return_token_ids=True)
    assert lora.status_code == merged.status_code == 200, merged.text
    tokens = merged.json()["choices"][0]["token_ids"]
    assert len(tokens) == MAX_TOKENS
    assert tokens == lora.json()["choices"][0]["token_ids"]


def test_merged_server_runs_the_engine_without_lora(merged_server):
    log = merged_server.log.read_text()
    assert "serving one adapter merged into the base weights" in log
    merged_dirs = [p for p in (merged_server.home / "merged").iterdir() if not p.name.startswith(".")]
    assert len(merged_dirs) == 1
    info = json.loads((merged_dirs[0] / "aura_merge.json").read_text())
    assert len(info["base_sha256"]) == len(info["lora_sha256"]) == 64
    card = httpx.get(f"{merged_server.url}/v1/adapters/alpha", timeout=30).json()
    assert card["resident"] == "engine" and card["status"] == "serving"


def test_other_adapters_replace_and_unload_are_refused_with_409(merged_server, tiny, speech):
    url = merged_server.url
    r = httpx.post(f"{url}/v1/adapters", json={"name": "beta", "source": str(tiny.adapters["beta"])}, timeout=60)
    assert r.status_code == 409 and r.json()["error"]["code"] == "merged_adapter_only", r.text
    r = httpx.post(f"{url}/v1/adapters", json={"name": "alpha", "source": str(tiny.adapters["alpha"])}, timeout=60)
    assert r.status_code == 409 and r.json()["error"]["code"] == "merged_adapter_replace", r.text
    assert "restart" in r.json()["error"]["message"]
    r = httpx.delete(f"{url}/v1/adapters/alpha", timeout=60)
    assert r.status_code == 409 and r.json()["error"]["code"] == "merged_adapter_unload", r.text
    r = post_audio(url, speech["capital"], adapter="beta", max_tokens=2)
    assert r.status_code == 404 and "serves only 'alpha'" in r.json()["error"]["message"], r.text
    # ... and nothing changed: alpha still answers.
    assert post_audio(url, speech["capital"], adapter="alpha", max_tokens=2).status_code == 200


def test_merge_of_an_adapter_that_is_not_the_only_one_fails_at_start(tiny, tmp_path):
    args = ["--model", str(tiny.llm), "--dtype", "float32", "--merge-adapter", "alpha"]
    for name, path in tiny.adapters.items():
        args += ["--adapter", f"{name}={path}"]
    with pytest.raises(RuntimeError, match=r"serves that one adapter only, but \['beta'\]"):
        start_server(args, tmp_path, tmp_path / "server.log", timeout=120)
    with pytest.raises(RuntimeError, match="no adapter of that name is configured"):
        start_server(["--model", str(tiny.llm), "--merge-adapter", "gamma", "--adapter", f"alpha={tiny.adapters['alpha']}"],
                     tmp_path, tmp_path / "server2.log", timeout=120)
