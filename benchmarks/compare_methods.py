"""The study: GRPO, PAPO and CPPO on the default run, several seeds, same data and evaluation.

    python benchmarks/compare_methods.py --seeds 0 1 2               # train, evaluate, summarise
    python benchmarks/compare_methods.py --seeds 0 1 2 --jobs 2      # two runs at a time
    python benchmarks/compare_methods.py --seeds 0 1 2 --no-train    # summarise existing runs

Each (method, seed) runs the README's command with the method's overlay (CPPO is
configs/base.yaml itself; GRPO and PAPO add configs/experiments/{grpo,papo}.yaml) into
runs/compare/METHOD-seedSEED, then `cppo evaluate` scores its exported policy (and, once, the warm
start) on the held-out split: avg@4 at temperature 1 under the original, blank and shuffled
images, into runs/compare/eval/NAME. The script prints markdown tables:

- held-out avg@4 after training per run and per method (mean over seeds with a 95% t-interval),
  with the visual-reliance gaps (original minus blank, minus shuffled) of the warm start and after
  training, and the greedy figures the Evaluation callback logged at the first and last step;
- CPPO's detection per seed, early (first third of the logged steps) and late (last third):
  precision of the selected tokens, the base rate, the random and highest-entropy baselines with
  the same budget, and the precision at rho 0.1 / 0.25 / 0.5 (PerceptionMonitor's
  `perception/precision*`), each a mean over logged steps;
- the contrastive term per seed: median D+ and D-, median `perception/contrast_accuracy`, mean
  `perception/cpl` over the first and last tenth;
- the median step time of each run (rollout + update as logged; the side-by-side ratio of
  benchmarks/step_time.py is the one to quote).

It writes docs/img/methods.png (val/accuracy), gap.png (greedy gap over training), detection.png
(precision against the baselines) and cpl.png (D+, D-, CPL).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OVERLAYS = {"grpo": "configs/experiments/grpo.yaml", "papo": "configs/experiments/papo.yaml"}
WARM_START = "builtin:tiny-qwen2.5-vl"
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
# Every metric is logged at the optimizer step (train/*, rollout/*, perception/* after each
# rollout batch; val/*, eval/* at each evaluation). Runs from before 2026-12-07 logged the
# training metrics by rollout batch: the plots in docs/img made from those say so on their axis.
# Two-sided 95% Student t quantiles by degrees of freedom (n - 1 seeds).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def latest_version(run_dir: Path) -> Path:
    versions = sorted(
        (run_dir / "lightning_logs").glob("version_*"), key=lambda p: p.stat().st_mtime
    )
    if not versions:
        raise FileNotFoundError(f"no lightning_logs/version_* under {run_dir}: run it first.")
    return versions[-1]


def read_all_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(latest_version(run_dir)), size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def finished(run_dir: Path) -> bool:
    """A run counts once its last version exported its policy (ExportPolicy runs at fit end)."""
    try:
        return (latest_version(run_dir) / "hf_policy" / "config.json").is_file()
    except FileNotFoundError:
        return False


def thread_env(jobs: int) -> dict[str, str] | None:
    """The environment of one of ``jobs`` concurrent runs: the CPU's cores shared out evenly
    (None, the inherited environment, for one run at a time)."""
    if jobs <= 1:
        return None
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    return {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


def train(method: str, seed: int, run_dir: Path, overrides: list[str], jobs: int = 1) -> float:
    command = ["cppo", "fit", "--config", "configs/base.yaml"]
    if method in OVERLAYS:
        command += ["--config", OVERLAYS[method]]
    command += [
        f"--seed_everything={seed}",
        f"--trainer.default_root_dir={run_dir}",
        "--trainer.enable_progress_bar=false",
        *overrides,
    ]
    print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL, env=thread_env(jobs))
    return time.perf_counter() - start


def evaluate(model: str, output: Path, eval_set: str, jobs: int = 1) -> dict[str, dict[str, Any]]:
    """avg@4 at temperature 1 under each condition (cached in ``output``/results.json)."""
    results = output / "results.json"
    if not results.is_file():
        command = [
            "cppo",
            "evaluate",
            model,
            "--eval",
            eval_set,
            "--samples",
            "4",
            "--temperature",
            "1.0",
            "--batch-size",
            "16",
            "--images",
            *CONDITIONS,
            "--output",
            str(output),
            "--no-progress-bar",
        ]
        print("$", " ".join(command), flush=True)
        env = thread_env(jobs)
        subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL, env=env)
    payload = json.loads(results.read_text())
    return {r["images"]: r for r in payload["results"]}


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval (nan for one value)."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, math.nan
    half = T95.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, half


def window(series: list[tuple[int, float]], first: float, last: float) -> list[float]:
    """Values of ``series`` whose position lies in the ``[first, last)`` fraction of it."""
    n = len(series)
    return [v for i, (_, v) in enumerate(series) if first * n <= i < max(last * n, first * n + 1)]


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


def pct(value: float) -> str:
    return "-" if math.isnan(value) else f"{100 * value:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["grpo", "papo", "cppo"])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "compare")
    parser.add_argument("--no-train", action="store_true", help="only read existing runs")
    parser.add_argument("--img", type=Path, default=REPO / "docs" / "img")
    parser.add_argument(
        "--eval-set", default="configs/eval/synthetic.yaml", help="the held-out set to score"
    )
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="ARG",
        help="an extra `cppo fit` argument for every run, repeatable, e.g. "
        "--override=--trainer.max_steps=4 (a smoke test of this script; the study uses none)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs trained at once, each with cores/jobs threads (a 0.9M-parameter model uses two "
        "cores poorly: two single-thread runs finish sooner than two runs one after the other; "
        "step times are then per-thread figures)",
    )
    args = parser.parse_args()
    if args.jobs < 1:
        raise SystemExit(f"--jobs {args.jobs}: give 1 or more.")

    def run_dir(method: str, seed: int) -> Path:
        return args.out / f"{method}-seed{seed}"

    if not args.no_train:
        todo = []
        for seed in args.seeds:
            for method in args.methods:
                if finished(run_dir(method, seed)):
                    print(f"{method} seed {seed}: exists, not retrained", flush=True)
                else:
                    todo.append((method, seed))

        def one(run: tuple[str, int]) -> None:
            # An interrupted run's version stays on disk; the rerun writes the next version.
            seconds = train(*run, run_dir(*run), args.override, args.jobs)
            print(f"{run[0]} seed {run[1]}: {seconds:.0f} s", flush=True)

        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = [pool.submit(one, run) for run in todo]
            try:
                for future in futures:
                    future.result()
            except BaseException:  # a failed run stops the study: the runs not started are not
                for future in futures:  # started; those under way finish (each its own folder)
                    future.cancel()
                raise

    runs = [(m, s) for m in args.methods for s in args.seeds if finished(run_dir(m, s))]
    if not runs:
        raise SystemExit(f"no finished runs under {args.out}: train them first.")
    scalars = {run: read_all_scalars(run_dir(*run)) for run in runs}
    models = {"warm-start": WARM_START} | {
        f"{m}-seed{s}": str(latest_version(run_dir(m, s)) / "hf_policy") for m, s in runs
    }
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {
            name: pool.submit(evaluate, model, args.out / "eval" / name, args.eval_set, args.jobs)
            for name, model in models.items()
        }
    scored = {name: future.result() for name, future in futures.items()}
    warm = scored["warm-start"]
    final = {run: scored[f"{run[0]}-seed{run[1]}"] for run in runs}

    def gaps(results: dict[str, dict[str, Any]]) -> str:
        return " / ".join(f"{100 * results[c]['gap']:+.1f}" for c in CONDITIONS[1:])

    def greedy(run: tuple[str, int], at: int) -> str:
        values = [scalars[run].get(f"eval/synthetic/{c}/accuracy", [])[at:][:1] for c in CONDITIONS]
        if not all(values):
            return "-"
        original, *others = (v[0][1] for v in values)
        return f"{pct(original)} ({' / '.join(f'{100 * (original - o):+.1f}' for o in others)})"

    print("\nHeld-out (256 prompts of configs/eval/synthetic.yaml), after training\n")
    print(
        "| run | val/accuracy start -> end | avg@4 original [95% CI] | gap blank / shuffled | "
        "greedy start (gaps) | greedy end (gaps) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    w = warm["original"]
    print(
        f"| warm start | - | {pct(w['accuracy'])} [{pct(w['ci95'][0])}-{pct(w['ci95'][1])}] | "
        f"{gaps(warm)} | - | - |"
    )
    for run in runs:
        val = scalars[run].get("val/accuracy", [])
        r = final[run]["original"]
        print(
            f"| {run[0]} seed {run[1]} | {pct(val[0][1])} -> {pct(val[-1][1])} | "
            f"{pct(r['accuracy'])} [{pct(r['ci95'][0])}-{pct(r['ci95'][1])}] | "
            f"{gaps(final[run])} | {greedy(run, 0)} | {greedy(run, -1)} |"
        )

    print("\nPer method, mean over seeds +- 95% t-interval (points)\n")
    print("| method | seeds | avg@4 original | gap blank | gap shuffled | val/accuracy gain |")
    print("|---|---:|---:|---:|---:|---:|")
    for method in args.methods:
        mine = [run for run in runs if run[0] == method]
        if not mine:
            continue
        cells = []
        for value in (
            lambda run: final[run]["original"]["accuracy"],
            lambda run: final[run]["blank"]["gap"],
            lambda run: final[run]["shuffled"]["gap"],
            lambda run: scalars[run]["val/accuracy"][-1][1] - scalars[run]["val/accuracy"][0][1],
        ):
            mean, half = mean_ci([value(run) for run in mine])
            cells.append(f"{100 * mean:.1f} +- {pct(half)}")
        print(f"| {method} | {len(mine)} | " + " | ".join(cells) + " |")

    cppo = [run for run in runs if run[0] == "cppo"]
    if cppo:
        print(
            "\nCPPO detection: share of chosen tokens inside a perception word, mean over steps\n"
        )
        print("| seed | window | " + " | ".join(label for _, label in DETECTION) + " | lift |")
        print("|---:|---|" + "---:|" * (len(DETECTION) + 1))
        for run in cppo:
            for name, first, last in (("early", 0, 1 / 3), ("late", 2 / 3, 1), ("run", 0, 1)):
                means = [
                    statistics.mean(window(scalars[run][f"perception/{key}"], first, last))
                    for key, _ in DETECTION
                ]
                cells = " | ".join(f"{m:.3f}" for m in means)
                print(f"| {run[1]} | {name} | {cells} | {means[0] / means[1]:.2f}x |")
        print("\nCPPO contrastive term\n")
        print(
            "| seed | median D+ | median D- | median contrast_accuracy | cpl first tenth | "
            "cpl last tenth | lambda |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for run in cppo:
            f = cpl_figures(scalars[run])
            print(
                f"| {run[1]} | {f['d_pos']:.4f} | {f['d_neg']:.4f} | {f['contrast_accuracy']:.3f}"
                f" | {f['cpl_first_tenth']:.3f} | {f['cpl_last_tenth']:.3f}"
                f" | {scalars[run]['perception/lambda'][-1][1]:g} |"
            )

    print("\nStep time (median over logged steps of rollout/seconds + train/update_seconds)\n")
    print("| run | rollout s | update s | step s |")
    print("|---|---:|---:|---:|")
    for run in runs:
        rollout = statistics.median(v for _, v in scalars[run]["rollout/seconds"])
        update = statistics.median(v for _, v in scalars[run]["train/update_seconds"])
        print(f"| {run[0]} seed {run[1]} | {rollout:.3f} | {update:.3f} | {rollout + update:.3f} |")

    plot(args.img, args.methods, runs, scalars)


def plot(img: Path, methods: list[str], runs: list, scalars: dict) -> None:  # type: ignore[type-arg]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install -e .[dev])", file=sys.stderr)
        return
    img.mkdir(parents=True, exist_ok=True)
    colours = {m: f"C{i}" for i, m in enumerate(methods)}

    def save(fig, ax, ylabel: str, title: str, name: str, x: str = "optimizer step") -> None:  # type: ignore[no-untyped-def]
        ax.set_xlabel(x)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(img / name, dpi=120)
        plt.close(fig)
        print(f"wrote {img / name}")

    def by_method(tag: str, ax) -> None:  # type: ignore[no-untyped-def]
        for method in methods:
            curves = [scalars[run].get(tag, []) for run in runs if run[0] == method]
            curves = [c for c in curves if c]
            for curve in curves:
                ax.plot(*zip(*curve, strict=True), color=colours[method], alpha=0.35, lw=1)
            if curves:
                steps = sorted(set.intersection(*(set(dict(c)) for c in curves)))
                mean = [statistics.mean(dict(c)[t] for c in curves) for t in steps]
                ax.plot(
                    steps,
                    mean,
                    color=colours[method],
                    marker="o",
                    lw=2,
                    label=f"{method} (mean of {len(curves)} seeds)",
                )

    fig, ax = plt.subplots(figsize=(6, 3.5))
    by_method("val/accuracy", ax)
    save(fig, ax, "val/accuracy (avg@4, T=1)", "Held-out accuracy, embedded model", "methods.png")

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
    for ax, condition in zip(axes, CONDITIONS[1:], strict=True):
        by_method(f"eval/synthetic/{condition}/gap", ax)
        ax.set_title(f"greedy accuracy: original minus {condition}", fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("gap (accuracy)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(img / "gap.png", dpi=120)
    plt.close(fig)
    print(f"wrote {img / 'gap.png'}")

    cppo = [run for run in runs if run[0] == "cppo"]
    if not cppo:
        return

    def smooth(series: list[tuple[int, float]], width: int = 10) -> tuple[list, list]:
        steps, values = zip(*series, strict=True)
        return list(steps), [
            statistics.mean(values[max(0, i - width + 1) : i + 1]) for i in range(len(values))
        ]

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, label in DETECTION[:4]:
        series = [scalars[run][f"perception/{key}"] for run in cppo]
        steps = sorted(set.intersection(*(set(dict(c)) for c in series)))
        mean = [(t, statistics.mean(dict(c)[t] for c in series)) for t in steps]
        ax.plot(*smooth(mean), label=label, ls="--" if key == "base_rate" else "-")
    save(
        fig,
        ax,
        "share of tokens in a perception word",
        f"CPPO detection vs baselines (mean of {len(cppo)} seeds, running mean of 10 points)",
        "detection.png",
    )

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, label in (("d_pos", "D+ (preserving)"), ("d_neg", "D- (removing)"), ("cpl", "CPL")):
        series = [scalars[run][f"perception/{key}"] for run in cppo]
        steps = sorted(set.intersection(*(set(dict(c)) for c in series)))
        mean = [(t, statistics.mean(dict(c)[t] for c in series)) for t in steps]
        ax.plot(*smooth(mean), label=label)
    ax.axhline(math.log(2), color="grey", lw=0.8, ls=":", label="ln 2 (D+ = D-)")
    ax.set_yscale("symlog", linthresh=0.01)
    title = f"CPPO contrastive term (mean of {len(cppo)} seeds)"
    save(fig, ax, "nats", title, "cpl.png")


if __name__ == "__main__":
    main()
