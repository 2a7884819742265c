"""DDP: 2 ranks x batch b (torchrun, gloo on the CPU) make the same update as 1 rank x batch 2b.

Tolerance: rtol 1e-3, atol 1e-4 on every trainable tensor after 3 AdamW steps in fp32 at lr 3e-3
(what differs is only the summation order of the gradient average, which AdamW's normalisation
can turn into ~1e-5 on near-zero gradients; a wrongly split or unsynchronised batch moves
parameters by ~1e-3). The losses are per-example means
(CTC), for which the average of two half-batch means is exactly the full-batch mean.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_training_stages import _config, world  # noqa: F401  (the tiny world fixture)

from adapters.training.trainer import Trainer


def _trainable(work_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = sorted(work_dir.glob("ckpt-*.pt"))[-1]
    return torch.load(ckpt, map_location="cpu", weights_only=False)["trainable"]


def test_two_ranks_match_one_rank_with_twice_the_batch(world: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    # SpecAugment on: each example's masks must not depend on which rank draws them
    common = dict(max_layer=1, ctc_weight=1.0, distill_loss="none", steps=3, lr=3e-3, eval_manifest=None,
                  spec_time_masks=2, spec_freq_masks=2)
    single = Trainer(_config(world, "ddp_single", batch_size=4, **common))
    single.run()

    cfg = _config(world, "ddp_two", batch_size=2, **common)
    args = ["--student", str(cfg.student), "--teacher", str(cfg.teacher), "--manifest", str(cfg.manifest),
            "--output", str(tmp_path / "two" / "adapter"), "--work-dir", str(tmp_path / "two" / "work"),
            "--teacher-cache", str(cfg.teacher_cache), "--lora-rank", "4", "--steps", "3", "--batch-size", "2",
            "--lr", "3e-3", "--warmup-steps", "2", "--layer-map", "0:0,1:1", "--max-layer", "1", "--ctc-weight", "1.0",
            "--distill-loss", "none", "--spec-time-masks", "2", "--spec-freq-masks", "2", "--threads", "1", "--no-progress", "--eval-every", "0", "--save-every", "0", "--log-every", "5"]
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
                           "-m", "adapters.training.ddp", *args], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["world_size"] == 2 and out["steps"] == 3

    a, b = _trainable(single.work_dir), _trainable(tmp_path / "two" / "work")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-3, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    lora_b = [n for n in a if "lora_B" in n and ".layers.0." in n]
    assert lora_b and all(float(b[n].abs().sum()) > 0 for n in lora_b)  # LoRA B starts at zero: the steps moved it


def test_ddp_refuses_to_run_outside_torchrun(world: dict[str, Path]) -> None:  # noqa: F811
    from adapters.training.ddp import DDPTrainer

    with pytest.raises(RuntimeError, match="torchrun"):
        DDPTrainer(_config(world, "ddp_none"))
