"""The study of docs/results.md: GRPO, PAPO and CPPO on the default run, several seeds, through
`cppo study`, plus CPPO's detection and contrastive-term tables.

    python benchmarks/compare_methods.py --seeds 0 1 2               # train, evaluate, summarise
    python benchmarks/compare_methods.py --seeds 0 1 2 --jobs 2      # two runs at a time
    python benchmarks/compare_methods.py --seeds 0 1 2 --no-train    # summarise existing runs

It runs (from the repository)

    cppo study --config configs/base.yaml --methods grpo papo cppo --seeds ... --output runs/compare

which trains each (method, seed) into runs/compare/runs/METHOD-seedSEED, scores its exported policy
with `cppo evaluate` (avg@4 at temperature 1 under the original, blank and shuffled images of
configs/eval/synthetic.yaml) and writes runs/compare/study.{json,md}, accuracy.png and gap.png
(docs/study.md). This script then prints study.md and, from the CPPO runs' TensorBoard logs:

- CPPO's detection per seed, early (first third of the logged steps) and late (last third):
  precision of the selected tokens, the base rate, the random and highest-entropy baselines with
  the same budget, and the precision at rho 0.1 / 0.25 / 0.5 (PerceptionMonitor's
  `perception/precision*`), each a mean over logged steps;
- the contrastive term per seed: median D+ and D-, median `perception/contrast_accuracy`, mean
  `perception/cpl` over the first and last tenth;

and draws runs/compare/detection.png and cpl.png. Unlike the script before `cppo study`, it does
not evaluate the warm start, and it does not write into docs/img; runs of the older layout
(runs/compare/METHOD-seedSEED) are not reused. benchmarks/run_summary.py imports the helpers
below.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
from pathlib import Path

from cppo_lightning.study.runs import attempts, fitted_version, run_scalars

REPO = Path(__file__).resolve().parents[1]
CONDITIONS = ("original", "blank", "shuffled")
DETECTION = (
    ("precision", "selected"),
    ("base_rate", "base rate"),
    ("precision_random", "random"),
    ("precision_entropy", "highest entropy"),
    ("precision_rho0.1", "rho 0.1"),
    ("precision_rho0.25", "rho 0.25"),
    ("precision_rho0.5", "rho 0.5"),
)


def read_all_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the run whose ``trainer.default_root_dir`` is ``run_dir``: its attempts'
    TensorBoard logs merged (a resumed attempt replaces the steps it redid)."""
    last = fitted_version(run_dir) or (attempts(run_dir) or [None])[-1]
    if last is None:
        raise FileNotFoundError(f"no lightning_logs/version_* under {run_dir}: run it first.")
    return run_scalars(run_dir, last)


def window(series: list[tuple[int, float]], first: float, last: float) -> list[float]:
    """Values of ``series`` whose position lies in the ``[first, last)`` fraction of it; at least
    the last value for a window past the end of a short series (one value for none)."""
    n = len(series)
    start = min(math.ceil(first * n), n - 1)
    end = max(math.ceil(last * n), start + 1)
    return [v for _, v in series[start:end]]


def cpl_figures(s: dict[str, list[tuple[int, float]]]) -> dict[str, float]:
    """Medians of D+, D-, contrast_accuracy and CPL over the logged steps; CPL's first and last
    tenth means (the issue's "over the last tenth of the run")."""

    def median(tag: str) -> float:
        return statistics.median(v for _, v in s[f"perception/{tag}"])

    cpl = s["perception/cpl"]
    return {
        **{tag: median(tag) for tag in ("d_pos", "d_neg", "contrast_accuracy", "cpl")},
        "cpl_first_tenth": statistics.mean(window(cpl, 0, 0.1)),
        "cpl_last_tenth": statistics.mean(window(cpl, 0.9, 1)),
    }


def cppo_tables(scalars: dict[int, dict[str, list[tuple[int, float]]]]) -> None:
    """Print the detection and contrastive-term tables of the CPPO runs (by seed)."""
    seeds = [seed for seed, s in scalars.items() if "perception/precision" in s]
    if seeds:
        print(
            "\nCPPO detection: share of chosen tokens inside a perception word, mean over steps\n"
        )
        print("| seed | window | " + " | ".join(label for _, label in DETECTION) + " | lift |")
        print("|---:|---|" + "---:|" * (len(DETECTION) + 1))
        for seed in seeds:
            for name, first, last in (("early", 0, 1 / 3), ("late", 2 / 3, 1), ("run", 0, 1)):
                means = [
                    statistics.fmean(
                        window(scalars[seed][f"perception/{key}"], first, last) or [math.nan]
                    )
                    for key, _ in DETECTION
                ]
                lift = f"{means[0] / means[1]:.2f}x" if means[1] else "-"
                print(f"| {seed} | {name} | {' | '.join(f'{m:.3f}' for m in means)} | {lift} |")
    seeds = [seed for seed, s in scalars.items() if "perception/cpl" in s]
    if seeds:
        print("\nCPPO contrastive term\n")
        print(
            "| seed | median D+ | median D- | median contrast_accuracy | cpl first tenth | "
            "cpl last tenth | lambda |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for seed in seeds:
            f = cpl_figures(scalars[seed])
            lam = scalars[seed].get("perception/lambda", [(0, math.nan)])[-1][1]
            print(
                f"| {seed} | {f['d_pos']:.4f} | {f['d_neg']:.4f} | {f['contrast_accuracy']:.3f}"
                f" | {f['cpl_first_tenth']:.3f} | {f['cpl_last_tenth']:.3f} | {lam:g} |"
            )


def cppo_plots(scalars: dict[int, dict[str, list[tuple[int, float]]]], folder: Path) -> None:
    """detection.png (precision against the baselines) and cpl.png (D+, D-, CPL), means over the
    CPPO seeds with a running mean of 10 points."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install -e .[dev])", file=sys.stderr)
        return
    runs = [s for s in scalars.values() if "perception/precision" in s and "perception/cpl" in s]
    if not runs:
        return

    def mean_curve(key: str) -> tuple[list[int], list[float]]:
        series = [dict(s[f"perception/{key}"]) for s in runs]
        steps = sorted(set.intersection(*(set(c) for c in series)))
        values = [statistics.mean(c[t] for c in series) for t in steps]
        smooth = [statistics.mean(values[max(0, i - 9) : i + 1]) for i in range(len(values))]
        return steps, smooth

    for name, keys, ylabel in (
        ("detection.png", DETECTION[:4], "share of tokens in a perception word"),
        (
            "cpl.png",
            (("d_pos", "D+ (preserving)"), ("d_neg", "D- (removing)"), ("cpl", "CPL")),
            "nats",
        ),
    ):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key, label in keys:
            ax.plot(*mean_curve(key), label=label, ls="--" if key == "base_rate" else "-")
        if name == "cpl.png":
            ax.axhline(math.log(2), color="grey", lw=0.8, ls=":", label="ln 2 (D+ = D-)")
            ax.set_yscale("symlog", linthresh=0.01)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.set_title(f"CPPO (mean of {len(runs)} seeds, running mean of 10 points)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / name, dpi=120)
        plt.close(fig)
        print(f"wrote {folder / name}")


def main() -> int:
    from cppo_lightning.errors import ConfigError
    from cppo_lightning.study.command import main as study

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["grpo", "papo", "cppo"])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "compare")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (cppo study --jobs)")
    parser.add_argument("--no-train", action="store_true", help="only report finished runs")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="ARG",
        help="an extra `cppo fit` argument for every run, repeatable, e.g. "
        "--override=--trainer.max_steps=4 (a smoke test of this script; the study uses none)",
    )
    args = parser.parse_args()
    out = args.out.resolve()
    os.chdir(REPO)  # the configs name their files relative to the repository
    command = ["--config", "configs/base.yaml", "--methods", *args.methods, "--seeds"]
    command += [str(s) for s in args.seeds] + ["--output", str(out), "--jobs", str(args.jobs)]
    command += ["--report-only"] if args.no_train else []
    try:
        status = study(command + args.override)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("\n" + (out / "study.md").read_text())
    scalars = {}
    if "cppo" in args.methods:
        for seed in args.seeds:
            run_dir = out / "runs" / f"cppo-seed{seed}"
            if (run_dir / "run.json").is_file():
                scalars[seed] = read_all_scalars(run_dir)
    cppo_tables(scalars)
    cppo_plots(scalars, out)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
