"""Time the training step of the default run: rollout (generate + score) vs update.

    python benchmarks/step_time.py [--steps 30] [--config configs/base.yaml] [--accelerator cpu]

Runs `cppo fit` in-process for a few steps with the given config, reads the per-step timings the
module logs (`rollout/seconds`, `train/update_seconds`) and prints their medians, the share of
each, and peak memory (CUDA peak allocated, or the process's max RSS on CPU). Figures go into
docs/results.md; nothing here is asserted by tests.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cppo_lightning.cli import main as cppo

REPO = Path(__file__).resolve().parents[1]


def _scalars(log_dir: str, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(log_dir)
    events.Reload()
    return [e.value for e in events.Scalars(tag)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--config", default=str(REPO / "configs" / "base.yaml"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--accelerator", default="auto")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        cli = cppo(
            [
                "fit",
                "--config",
                args.config,
                f"--trainer.max_steps={args.steps}",
                f"--trainer.val_check_interval={args.steps}",
                "--trainer.num_sanity_val_steps=0",
                "--trainer.log_every_n_steps=1",
                "--trainer.enable_progress_bar=false",
                "--trainer.enable_checkpointing=false",
                f"--trainer.accelerator={args.accelerator}",
                f"--trainer.default_root_dir={tmp}",
                "--trainer.callbacks=[]",
            ]
        )
        wall = time.perf_counter() - start
        log_dir = cli.trainer.log_dir
        assert log_dir is not None
        rollout = _scalars(log_dir, "rollout/seconds")[1:]  # the first step warms caches
        update = _scalars(log_dir, "train/update_seconds")[1:]
    on_gpu = cli.trainer.strategy.root_device.type == "cuda"  # fit moves the model back to CPU
    if on_gpu:
        peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (CUDA, peak allocated)"
    else:
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (max RSS)"
    r, u = statistics.median(rollout), statistics.median(update)
    device = torch.cuda.get_device_name() if on_gpu else f"cpu ({torch.get_num_threads()} threads)"
    print(f"config: {args.config}  device: {device}  steps: {args.steps}")
    print(f"median rollout (generate + score): {r:.3f} s  ({r / (r + u):.0%} of a step)")
    print(f"median update (ref pass + fwd/bwd + step): {u:.3f} s  ({u / (r + u):.0%} of a step)")
    print(f"median step: {r + u:.3f} s   whole run incl. start-up and validation: {wall:.1f} s")
    print(f"peak memory: {peak}")


if __name__ == "__main__":
    main()
