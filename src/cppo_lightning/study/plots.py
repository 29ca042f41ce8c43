"""The study's plots, from ``study.json``'s content: ``accuracy.png`` (val/accuracy over training
per method, the mean over seeds with the band from the lowest to the highest seed), ``gap.png``
(the avg@k gaps of each method after training, mean over seeds with the 95% t-interval, each seed
a dot) and, when the runs logged the Evaluation callback's greedy accuracy, ``greedy.png`` (that
accuracy over training with the original images, one panel per evaluation set, drawn as
``accuracy.png``). matplotlib is a dev extra: without it nothing is drawn and the caller says so."""

from __future__ import annotations

import os
import statistics
from pathlib import Path
from typing import Any


def have_matplotlib() -> bool:
    """Whether matplotlib imports."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_study(study: dict[str, Any], folder: Path) -> list[Path]:
    """Draw ``accuracy.png`` and ``gap.png`` into ``folder``; the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in study["runs"] if r.get("status") == "finished"]
    methods = [m for m in study["methods"] if any(r["method"] == m for r in runs)]
    colours = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    # Past ten methods the colours repeat: the second ten are dashed.
    styles = {m: "-" if i < 10 else "--" for i, m in enumerate(methods)}
    written = []

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for method in methods:
        _mean_curve(ax, runs, method, "val/accuracy", colours, styles)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("val/accuracy")
    ax.set_title("Held-out accuracy over training (band: lowest to highest seed)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(_save(fig, folder / "accuracy.png"))

    sets = sorted(
        {
            tag.split("/")[1]
            for r in runs
            for tag in r["curves"]
            if tag.startswith("eval/") and tag.endswith("/original/accuracy")
        }
    )
    if sets:
        fig, axes = plt.subplots(1, len(sets), figsize=(5 * len(sets), 3.8), squeeze=False)
        for ax, name in zip(axes[0], sets, strict=True):
            for method in methods:
                _mean_curve(ax, runs, method, f"eval/{name}/original/accuracy", colours, styles)
            ax.set_xlabel("optimizer step")
            ax.set_title(f"greedy accuracy on {name} (band: lowest to highest seed)", fontsize=9)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("accuracy (original images)")
        axes[0][-1].legend(fontsize=7)
        fig.tight_layout()
        written.append(_save(fig, folder / "greedy.png"))

    k = study["settings"]["samples"]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.5), sharey=True)
    for ax, condition in zip(axes, ("blank", "shuffled"), strict=True):
        for i, method in enumerate(methods):
            summary = study["per_method"][method]["figures"][f"gap_{condition}"]
            if summary["mean"] is None:
                continue
            mean = 100 * summary["mean"]
            error = None if summary["half_width"] is None else 100 * summary["half_width"]
            ax.bar(i, mean, color=colours[method], alpha=0.6, yerr=error, capsize=4)
            dots = [100 * v for v in summary["values"]]
            ax.scatter([i] * len(dots), dots, s=12, color="black", zorder=3)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(range(len(methods)), methods, rotation=30, fontsize=8)
        ax.set_title(f"avg@{k}: original minus {condition}", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("gap (points; 95% t-interval)")
    fig.tight_layout()
    written.append(_save(fig, folder / "gap.png"))
    return written


def _mean_curve(
    ax: Any,
    runs: list[dict[str, Any]],
    method: str,
    tag: str,
    colours: dict[str, str],
    styles: dict[str, str],
) -> None:
    """The mean over the method's seeds of the curve ``tag`` at the steps every seed logged,
    with the band from the lowest to the highest seed."""
    curves = [dict(r["curves"].get(tag, [])) for r in runs if r["method"] == method]
    curves = [c for c in curves if c]
    if not curves:
        return
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    values = [[c[s] for c in curves] for s in steps]
    ax.plot(
        steps,
        [statistics.fmean(v) for v in values],
        color=colours[method],
        linestyle=styles[method],
        marker="o",
        lw=2,
        label=f"{method} ({len(curves)} seed{'s' if len(curves) > 1 else ''})",
    )
    if len(curves) > 1:
        ax.fill_between(
            steps,
            [min(v) for v in values],
            [max(v) for v in values],
            color=colours[method],
            alpha=0.2,
            lw=0,
        )


def _save(fig: Any, path: Path) -> Path:
    """Save ``fig`` as the PNG ``path`` through a temporary file and a rename, and close it."""
    import matplotlib.pyplot as plt

    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fig.savefig(temporary, dpi=120, format="png")
    plt.close(fig)
    os.replace(temporary, path)
    return path
