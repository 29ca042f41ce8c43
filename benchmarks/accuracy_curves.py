"""Held-out accuracy curves of the default run for several seeds, as a table and a plot.

    python benchmarks/accuracy_curves.py --seeds 0 1 2            # train, then summarise
    python benchmarks/accuracy_curves.py --seeds 0 1 2 --no-train # summarise existing runs

Each seed runs `cppo fit --config configs/base.yaml --seed_everything SEED` (a subprocess, exactly
the README's command) into runs/results/seedSEED, timing it. The script then reads `val/accuracy`
from the TensorBoard logs, prints a markdown table (paste it into docs/results.md) and writes
docs/img/val_accuracy.png.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def read_curve(run_dir: Path, tag: str = "val/accuracy") -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    versions = sorted(
        (run_dir / "lightning_logs").glob("version_*"), key=lambda p: p.stat().st_mtime
    )
    if not versions:
        raise FileNotFoundError(f"no lightning_logs/version_* under {run_dir}: run it first.")
    events = EventAccumulator(str(versions[-1]))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--config", default="configs/base.yaml")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "results")
    parser.add_argument("--no-train", action="store_true", help="only read existing runs")
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "img" / "val_accuracy.png")
    args = parser.parse_args()

    durations: dict[int, float] = {}
    for seed in args.seeds:
        run_dir = args.out / f"seed{seed}"
        if args.no_train:
            continue
        command = [
            "cppo", "fit", "--config", args.config, f"--seed_everything={seed}",
            f"--trainer.default_root_dir={run_dir}", "--trainer.enable_progress_bar=false",
        ]  # fmt: skip
        print("$", " ".join(command), flush=True)
        start = time.perf_counter()
        subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
        durations[seed] = time.perf_counter() - start

    curves = {seed: read_curve(args.out / f"seed{seed}") for seed in args.seeds}
    steps = sorted({step for curve in curves.values() for step, _ in curve})
    print("| step | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean |")
    print("|---:|" + "---:|" * (len(args.seeds) + 1))
    for step in steps:
        values = [dict(curves[s]).get(step) for s in args.seeds]
        known = [v for v in values if v is not None]
        cells = " | ".join("" if v is None else f"{v:.3f}" for v in values)
        print(f"| {step} | {cells} | {sum(known) / len(known):.3f} |")
    gains = [curves[s][-1][1] - curves[s][0][1] for s in args.seeds]
    print("\ngain (last - before first update), points:", [round(100 * g, 1) for g in gains])
    if durations:
        print("fit wall-clock, s:", {s: round(d) for s, d in durations.items()})

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install -e .[dev])", file=sys.stderr)
        return
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for seed, curve in curves.items():
        ax.plot(*zip(*curve, strict=True), marker="o", label=f"seed {seed}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("val/accuracy (avg@4, T=1)")
    ax.set_title("GRPO on the embedded tiny Qwen2.5-VL, synthetic shapes")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
