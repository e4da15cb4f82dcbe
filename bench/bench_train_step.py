"""Benchmark: one training step of the image branch's CNN, with glibc's default allocator settings and then
with ``modelling.train.memory.reuse_freed_memory`` (freed memory kept for reuse), in the same process.

    .venv/bin/python bench/bench_train_step.py [--runs 5 --steps 4 --batch 64 --threads 2]

A step is forward + backward + AdamW on a batch of random volumes of the contract's shape, as in
``modelling.train.loop.fit``. Prints, per setting, the median over ``--runs`` rounds of the per-round median step
time and the process's system (kernel) CPU time per step, then the ratio default / reuse. The default
rounds run first: ``mallopt`` cannot be undone in a process. Figures, not assertions.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inference import contract as C  # noqa: E402
from modelling.config import FusionConfig  # noqa: E402
from modelling.model import FusionModel  # noqa: E402
from modelling.train.memory import reuse_freed_memory  # noqa: E402


def rounds(runs: int, steps: int, batch: int) -> tuple[float, float]:
    """(median step seconds, system CPU seconds per step) over ``runs`` rounds of ``steps`` steps."""
    torch.manual_seed(0)
    model = FusionModel(FusionConfig(variant="image", spot_channels=0))
    branch = model.image_branch
    assert branch is not None
    opt = torch.optim.AdamW(branch.parameters(), lr=1e-3)
    x = torch.randn(batch, 1, *C.VOLUME_SHAPE)

    def step() -> None:
        concepts, seg = branch.forward_with_seg(x)
        loss = concepts.square().mean() + seg.square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up
    medians, sys_before = [], os.times().system
    for _ in range(runs):
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            step()
            times.append(time.perf_counter() - started)
        medians.append(statistics.median(times))
    return statistics.median(medians), (os.times().system - sys_before) / (runs * steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"image-branch CNN training step, batch {args.batch}, {args.threads} threads, {args.runs} x {args.steps}")
    default, default_sys = rounds(args.runs, args.steps, args.batch)
    print(f"  glibc defaults      : {default:6.2f} s/step (system CPU {default_sys:5.2f} s/step)")
    if not reuse_freed_memory():
        print("  not glibc: nothing to compare")
        return
    reuse, reuse_sys = rounds(args.runs, args.steps, args.batch)
    print(f"  reuse_freed_memory  : {reuse:6.2f} s/step (system CPU {reuse_sys:5.2f} s/step)")
    print(f"  ratio default/reuse : {default / reuse:6.2f}x")


if __name__ == "__main__":
    main()
