"""The segmented CPU LoRA path gives vLLM's own tokens, and is what vLLM really runs.

The engine test builds vLLM's offline engine twice on the same tiny fp32 model, once per kernel
(``AURA_CPU_LORA_KERNEL``), and runs one deterministic batch that mixes three adapters of ranks
8, 16 and 4, a request without LoRA, a prompt given as embeddings, and chunked prefills next to
decodes. The kernel test compares the two wrappers op for op, in fp32 and bf16.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch import ROOT

PROBE = Path(__file__).resolve().parent / "lora_kernel_probe.py"


@pytest.fixture(scope="module")
def ranked_adapters(tiny, tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, Path]]:
    from adapters.adapter import init_adapter

    root = tmp_path_factory.mktemp("ranked")
    return [(f"r{rank}", init_adapter(tiny.llm, root / f"r{rank}", rank=rank, seed=10 + rank,
                                      lora_init_std=0.05, conv_channels=64))
            for rank in (8, 16, 4)]


def run_probe(kernel: str, model: Path, adapters: list[tuple[str, Path]], out_dir: Path) -> tuple[list, str]:
    out = out_dir / f"{kernel}.json"
    env = {**os.environ, "AURA_CPU_LORA_KERNEL": kernel, "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_LOGGING_LEVEL": "INFO"}
    proc = subprocess.run(
        [sys.executable, str(PROBE), str(out), str(model), *(f"{n}={p}" for n, p in adapters)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    return json.loads(out.read_text()), log


def test_plugin_is_registered_with_vllm():
    from importlib.metadata import entry_points

    from server.engine.cpu_lora_plugin import ENTRY_POINT_NAME

    names = {ep.name for ep in entry_points(group="vllm.general_plugins")}
    assert ENTRY_POINT_NAME in names, "reinstall the package (pip install -e .): vLLM finds plugins by entry point"


def test_segmented_kernel_gives_vllms_tokens_over_mixed_adapters(tiny, ranked_adapters, tmp_path):
    theirs, their_log = run_probe("vllm", tiny.llm, ranked_adapters, tmp_path)
    ours, our_log = run_probe("segmented", tiny.llm, ranked_adapters, tmp_path)
    # The plugin really switched the wrapper in the engine's worker, and only when asked to.
    assert "Using SegmentedPunicaWrapperCPU" in our_log
    assert "Using PunicaWrapperCPU" in their_log and "SegmentedPunicaWrapperCPU" not in their_log
    assert ours == theirs
    # Rows 8..11: one prompt without LoRA and with each adapter. All differ, so the comparison
    # above could not pass with the LoRA (or one rank) silently ignored.
    guard = [tuple(t) for t in ours[8:12]]
    assert len(set(guard)) == 4


def _wrappers(token_slots: list[int], num_loras: int):
    from vllm.lora.layers import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    from server.engine.cpu_lora import SegmentedPunicaWrapperCPU

    ids = tuple(s + 1 if s >= 0 else 0 for s in token_slots)  # LoRA ids: slot + 1; 0 = none
    mapping = LoRAMapping(ids, ids, is_prefill=True)
    index_to_id = [i + 1 for i in range(num_loras)]
    out = []
    for cls in (PunicaWrapperCPU, SegmentedPunicaWrapperCPU):
        w = cls(1024, 64, "cpu")
        w.update_metadata(mapping, index_to_id, num_loras, 1000)
        out.append(w)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_segmented_ops_match_vllms_torch_ops(dtype):
    """Op-level: the same deltas as vLLM's per-token gathers (fp rounding aside), on a batch
    with interleaved adapter runs and fused slices (like qkv_proj)."""
    gen = torch.Generator().manual_seed(0)
    slots = [0] * 7 + [1] * 3 + [0] * 5 + [2] * 11 + [1]
    n, d_in, rank, outs = len(slots), 96, 16, (64, 32, 32)
    a = tuple(torch.randn(3, 1, rank, d_in, generator=gen).to(dtype) for _ in outs)
    b = tuple(torch.randn(3, 1, o, rank, generator=gen).to(dtype) for o in outs)
    x = torch.randn(n, d_in, generator=gen).to(dtype)
    y0 = torch.randn(n, sum(outs), generator=gen).to(dtype)
    results = []
    for w in _wrappers(slots, 3):
        y = y0.clone()
        w.add_lora_linear(y, x, a, b, 0.5, outs)
        results.append(y.float())
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert not torch.equal(results[1], y0.float())
    torch.testing.assert_close(results[1], results[0], rtol=tol, atol=tol * results[0].abs().max().item())


def test_tokens_without_lora_get_no_delta():
    """Index -1 means "no LoRA": those rows stay as they were, even with every slot occupied
    (vLLM's torch ops index weights[-1] there, i.e. the last slot's adapter)."""
    slots = [0] * 4 + [-1] * 5 + [1] * 3
    gen = torch.Generator().manual_seed(1)
    a = (torch.randn(2, 1, 8, 32, generator=gen),)
    b = (torch.randn(2, 1, 16, 8, generator=gen),)
    x = torch.randn(len(slots), 32, generator=gen)
    y0 = torch.randn(len(slots), 16, generator=gen)
    _, ours = _wrappers(slots, 2)
    y = y0.clone()
    ours.add_lora_linear(y, x, a, b, 1.0, (16,))
    assert torch.equal(y[4:9], y0[4:9])
    assert not torch.equal(y[:4], y0[:4]) and not torch.equal(y[9:], y0[9:])
