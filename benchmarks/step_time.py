"""Time a training step of GRPO, PAPO and CPPO on the same run, side by side, and print ratios.

    python benchmarks/step_time.py [--steps 12] [--rounds 3] [--accelerator auto]

Each (method, round) runs `cppo fit` for a few steps in a fresh child process (so peak memory is
per method): CPPO is configs/base.yaml, every other method adds its configs/experiments/ overlay
(`--methods cppo grpo dapo ...`; default cppo grpo papo).
Rounds interleave the methods (cppo, grpo, papo, cppo, ...), so a slow spell of a shared machine
hits all of them alike. The per-step timings the module logs (`rollout/seconds`,
`train/update_seconds`) are read back from TensorBoard, the first step of each child dropped
(warm-up), and their medians over all rounds printed with each method's ratio to GRPO. Drawing
the image views (DataModule, outside both logged timings) is timed separately on fresh batches
and counted in the step. Peak
memory: CUDA peak allocated on a GPU, else the child's max RSS. Figures go into
docs/results.md; nothing here is asserted by tests.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# Every method of configs/experiments/ (its overlay on base.yaml), and CPPO (base.yaml alone).
OVERLAYS = {
    "cppo": [],
    **{
        path.stem: [str(path.relative_to(REPO))]
        for path in sorted((REPO / "configs" / "experiments").glob("*.yaml"))
    },
}


def _scalars(log_dir: str, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(log_dir)
    events.Reload()
    return [e.value for e in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []


def child(method: str, steps: int, accelerator: str) -> None:
    """Run one short fit and print its per-step timings as one JSON line."""
    from cppo_lightning.cli import main as cppo

    configs = ["--config", str(REPO / "configs" / "base.yaml")]
    for overlay in OVERLAYS[method]:
        configs += ["--config", str(REPO / overlay)]
    with tempfile.TemporaryDirectory() as tmp:
        cli = cppo(
            [
                "fit",
                *configs,
                f"--trainer.max_steps={steps}",
                f"--trainer.val_check_interval={steps}",
                "--trainer.limit_val_batches=0",
                "--trainer.num_sanity_val_steps=0",
                "--trainer.log_every_n_steps=1",
                "--trainer.enable_progress_bar=false",
                "--trainer.enable_checkpointing=false",
                f"--trainer.accelerator={accelerator}",
                f"--trainer.default_root_dir={tmp}",
                "--trainer.callbacks=[]",
            ]
        )
        log_dir = cli.trainer.log_dir
        assert log_dir is not None
        # Drawing the views happens in the DataModule's on_after_batch_transfer, outside both
        # logged timings: time it on fresh batches (0 when the method draws no views).
        views = []
        maker = cli.datamodule.view_maker
        if maker is not None and maker.enabled:
            device = cli.trainer.strategy.root_device
            for _, batch in zip(range(steps), cli.datamodule.train_dataloader(), strict=False):
                batch = cli.datamodule.transfer_batch_to_device(batch, device, 0)
                start = time.perf_counter()
                maker(batch, 0)
                views.append(time.perf_counter() - start)
        result = {
            "views": views or [0.0],
            "rollout": _scalars(log_dir, "rollout/seconds")[1:],
            "update": _scalars(log_dir, "train/update_seconds")[1:],
            "selected": _scalars(log_dir, "perception/token_fraction")[1:],
            "gated": _scalars(log_dir, "perception/gated_fraction")[1:],
        }
    on_gpu = cli.trainer.strategy.root_device.type == "cuda"
    if on_gpu:
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["device"] = torch.cuda.get_device_name()
    else:
        result["peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        result["device"] = f"cpu ({torch.get_num_threads()} threads)"
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=12, help="steps per child run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--methods", nargs="+", default=["cppo", "grpo", "papo"], choices=sorted(OVERLAYS)
    )
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--child", choices=sorted(OVERLAYS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps, args.accelerator)
        return

    runs: dict[str, list[dict]] = {m: [] for m in args.methods}
    for round_ in range(args.rounds):
        for method in args.methods:
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    method,
                    "--steps",
                    str(args.steps),
                    "--accelerator",
                    args.accelerator,
                ],
                capture_output=True,
                text=True,
                cwd=REPO,
            )
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if out.returncode or not lines:
                sys.exit(f"{method} failed:\n{out.stderr[-3000:]}")
            runs[method].append(json.loads(lines[-1][len("RESULT ") :]))
            print(f"round {round_ + 1}/{args.rounds}: {method} done", file=sys.stderr)

    def median(method: str, key: str) -> float:
        values = [v for run in runs[method] for v in run[key]]
        return statistics.median(values) if values else float("nan")

    device = runs[args.methods[0]][0]["device"]
    print(f"device: {device}   {args.rounds} rounds x {args.steps} steps per method (interleaved)")
    print(
        f"{'method':<6} {'rollout s':>10} {'views s':>8} {'update s':>9} {'step s':>7} "
        f"{'x GRPO':>7} {'update x':>9} {'peak GiB':>9} {'selected':>9} {'gated':>6}"
    )

    def step(method: str) -> float:
        return median(method, "rollout") + median(method, "views") + median(method, "update")

    base = step("grpo") if "grpo" in runs else None
    base_update = median("grpo", "update") if "grpo" in runs else None
    for method in args.methods:
        r, v, u = median(method, "rollout"), median(method, "views"), median(method, "update")
        peak = max(run["peak_gib"] for run in runs[method])
        ratio = f"{step(method) / base:.2f}x" if base else "-"
        update_ratio = f"{u / base_update:.2f}x" if base_update else "-"
        selected = median(method, "selected")
        gated = median(method, "gated")
        print(
            f"{method:<6} {r:>10.3f} {v:>8.3f} {u:>9.3f} {step(method):>7.3f} {ratio:>7} "
            f"{update_ratio:>9} "
            f"{peak:>9.2f} {selected:>9.3f} {gated:>6.2f}"
        )


if __name__ == "__main__":
    main()
