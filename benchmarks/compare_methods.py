"""GRPO, PAPO and CPPO on the same run, and how well CPPO's detection finds perception words.

    python benchmarks/compare_methods.py --seeds 0                # train the three, summarise
    python benchmarks/compare_methods.py --seeds 0 --no-train     # summarise existing runs

Each (method, seed) runs the README's command with the method's overlay (CPPO is
configs/base.yaml itself; GRPO and PAPO add configs/experiments/{grpo,papo}.yaml) into
runs/compare/METHOD-seedSEED. The script prints a markdown table of `val/accuracy` per method,
and, for CPPO, the precision of the selected tokens against the base rate of perception words
among the tokens detection chose from (`perception/precision`, `perception/base_rate`, logged
every step by PerceptionMonitor), averaged over the first and the last `--window` steps. It
writes docs/img/methods.png and docs/img/detection.png.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OVERLAYS = {"grpo": "configs/experiments/grpo.yaml", "papo": "configs/experiments/papo.yaml"}


def read_scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    versions = sorted(
        (run_dir / "lightning_logs").glob("version_*"), key=lambda p: p.stat().st_mtime
    )
    if not versions:
        raise FileNotFoundError(f"no lightning_logs/version_* under {run_dir}: run it first.")
    events = EventAccumulator(str(versions[-1]), size_guidance={"scalars": 0})
    events.Reload()
    if tag not in events.Tags()["scalars"]:
        return []
    return [(e.step, e.value) for e in events.Scalars(tag)]


def train(method: str, seed: int, run_dir: Path) -> float:
    command = ["cppo", "fit", "--config", "configs/base.yaml"]
    if method in OVERLAYS:
        command += ["--config", OVERLAYS[method]]
    command += [
        f"--seed_everything={seed}",
        f"--trainer.default_root_dir={run_dir}",
        "--trainer.enable_progress_bar=false",
    ]
    print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--methods", nargs="+", default=["grpo", "papo", "cppo"])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "compare")
    parser.add_argument("--window", type=int, default=50, help="steps averaged early / late")
    parser.add_argument("--no-train", action="store_true", help="only read existing runs")
    parser.add_argument("--img", type=Path, default=REPO / "docs" / "img")
    args = parser.parse_args()

    def run_dir(method: str, seed: int) -> Path:
        return args.out / f"{method}-seed{seed}"

    if not args.no_train:
        for seed in args.seeds:
            for method in args.methods:
                seconds = train(method, seed, run_dir(method, seed))
                print(f"{method} seed {seed}: {seconds:.0f} s", flush=True)

    # Runs that do not exist (e.g. baselines trained for fewer seeds) are left out.
    curves = {
        (m, s): read_scalars(run_dir(m, s), "val/accuracy")
        for m in args.methods
        for s in args.seeds
        if (run_dir(m, s) / "lightning_logs").is_dir()
    }
    steps = sorted({step for curve in curves.values() for step, _ in curve})
    print("\nval/accuracy (avg@4, T=1, 256 held-out prompts)\n")
    print("| step | " + " | ".join(f"{m} s{s}" for m, s in curves) + " |")
    print("|---:|" + "---:|" * len(curves))
    for step in steps:
        cells = [dict(curve).get(step) for curve in curves.values()]
        print(f"| {step} | " + " | ".join("" if v is None else f"{v:.3f}" for v in cells) + " |")
    for (m, s), curve in curves.items():
        print(f"{m} seed {s}: gain {100 * (curve[-1][1] - curve[0][1]):+.1f} points")

    detection = {}
    if "cppo" in args.methods:
        print(f"\nCPPO detection, mean over the first / last {args.window} steps\n")
        print("| seed | window | precision | base rate | lift |")
        print("|---:|---|---:|---:|---:|")
        for seed in [s for m, s in curves if m == "cppo"]:
            precision = read_scalars(run_dir("cppo", seed), "perception/precision")
            base = read_scalars(run_dir("cppo", seed), "perception/base_rate")
            detection[seed] = (precision, base)
            last = precision[-1][0]
            for name, first_step, last_step in (
                ("early", 0, args.window - 1),
                ("late", last - args.window + 1, last),
            ):
                part_p = [(t, v) for t, v in precision if first_step <= t <= last_step]
                part_b = [v for t, v in base if first_step <= t <= last_step]
                p = statistics.mean(v for _, v in part_p)
                b = statistics.mean(part_b)
                steps_ = f"steps {part_p[0][0]}-{part_p[-1][0]}, {len(part_p)} points"
                print(f"| {seed} | {name} ({steps_}) | {p:.3f} | {b:.3f} | {p / b:.2f}x |")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install -e .[dev])", file=sys.stderr)
        return
    args.img.mkdir(parents=True, exist_ok=True)

    def save(fig, ax, ylabel: str, title: str, name: str) -> None:  # type: ignore[no-untyped-def]
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.img / name, dpi=120)
        print(f"wrote {args.img / name}")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for (method, seed), curve in curves.items():
        ax.plot(*zip(*curve, strict=True), marker="o", label=f"{method} (seed {seed})")
    save(
        fig,
        ax,
        "val/accuracy (avg@4, T=1)",
        "Embedded tiny Qwen2.5-VL, synthetic shapes",
        "methods.png",
    )
    if detection:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for number, (seed, (precision, base)) in enumerate(detection.items()):
            color = f"C{number}"
            for series, label, style in (
                (precision, "selected tokens", "-"),
                (base, "base rate", "--"),
            ):
                steps_, values = zip(*series, strict=True)
                smooth = [
                    statistics.mean(values[max(0, i - 9) : i + 1]) for i in range(len(values))
                ]
                ax.plot(steps_, smooth, style, color=color, label=f"{label} (seed {seed})")
        save(
            fig,
            ax,
            "share of tokens in a perception word",
            "CPPO: perception-word share, running mean of 10 logged points",
            "detection.png",
        )


if __name__ == "__main__":
    main()
