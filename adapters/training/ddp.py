"""Data-parallel AuRA training on PyTorch DistributedDataParallel: ``torchrun --nproc_per_node N -m adapters.training.ddp``.

Same arguments as ``aura train``. Each of the N ranks takes its own ``batch_size`` examples of a
global batch of ``N * batch_size`` (the global order is the single-process order, so N ranks x
batch b follow the same data as 1 rank x batch N*b), the student runs wrapped in DDP (gloo on the
CPU, NCCL on GPUs; gradients averaged over ranks in backward), and rank 0 alone logs, evaluates
and writes checkpoints and the adapter. Teacher targets live in one shared on-disk cache: each
rank computes those of its own clips on first use (no clip is computed twice in an epoch) and
every later epoch, rank and run reads them from there. Logged loss terms are rank 0's share.
"""

from __future__ import annotations

import contextlib
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from adapters.training.config import TrainConfig
from adapters.training.trainer import DataOrder, Trainer


class DDPTrainer(Trainer):
    def __init__(self, config: TrainConfig) -> None:
        if not dist.is_initialized():
            raise RuntimeError("DDPTrainer needs torch.distributed initialised (run under torchrun)")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if config.resolved_device() == "cuda":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            config = config.model_copy(update={"device": f"cuda:{local}"})
        if self.rank != 0:
            config = config.model_copy(update={"progress": False})
        super().__init__(config)
        self.order = DataOrder(len(self.examples), config.batch_size * self.world, config.seed)
        # broadcast_buffers off: the only buffers are rotary tables, equal everywhere, and a
        # forward-time collective would deadlock rank 0's evaluation while the others train
        self.ddp = DistributedDataParallel(self.student, find_unused_parameters=True, broadcast_buffers=False,
                                           device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def batch_indices(self, step: int) -> list[int]:
        full = self.order.batch(step)
        b = self.config.batch_size
        return full[self.rank * b : (self.rank + 1) * b]

    def train_module(self) -> torch.nn.Module:
        return self.ddp

    def micro_batch_context(self, *, last: bool) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext() if last else self.ddp.no_sync()

    def save_checkpoint(self, step: int) -> Path:
        path = self.work_dir / f"ckpt-{step:07d}.pt"
        if self.rank == 0:
            return super().save_checkpoint(step)
        return path

    def _after_step(self, *args: object, **kwargs: object) -> None:  # type: ignore[override]
        if self.rank == 0:
            super()._after_step(*args, **kwargs)  # type: ignore[arg-type]

    def evaluate(self, *, wer: bool = False) -> dict[str, float] | None:
        return super().evaluate(wer=wer) if self.rank == 0 else None

    def validate(self) -> dict[str, float] | None:
        return super().validate() if self.rank == 0 else None

    def export(self, final_eval: dict[str, float] | None = None) -> Path:
        return super().export(final_eval) if self.rank == 0 else self.config.output


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    from adapters.training.config import add_config_flags, config_from_flags

    parser = argparse.ArgumentParser(prog="torchrun ... -m adapters.training.ddp", description=__doc__)
    add_config_flags(parser)
    config = config_from_flags(parser.parse_args(argv))
    backend = "nccl" if config.resolved_device().startswith("cuda") else "gloo"
    dist.init_process_group(backend, timeout=timedelta(minutes=30))
    try:
        trainer = DDPTrainer(config)
        result = trainer.run()
        dist.barrier()
        if trainer.rank == 0:
            print(json.dumps({"adapter": str(result.output), "steps": result.steps, "final": result.final, "eval": result.eval,
                              "steps_per_s": round(result.steps_per_s, 4), "world_size": trainer.world}), flush=True)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
