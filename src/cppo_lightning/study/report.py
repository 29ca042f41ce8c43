"""The study's arithmetic and tables: Student t intervals over seeds, per-method aggregation, the
Markdown of ``study.md``. Pure functions on the run records (:mod:`cppo_lightning.study.runs`).

A run record's ``figures`` is a flat mapping ``name -> float | None`` (see :data:`FIGURES`);
:func:`aggregate` turns the records of one method into ``name -> {mean, low, high, half_width, n,
values}``, the interval being the two-sided 95% Student t interval of the mean over seeds.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

#: The figures of a run, in table order: (key, label, kind). ``kind`` says how a value is shown:
#: ``pct`` a share shown in percent, ``pts`` a difference of shares in percentage points, ``s``
#: seconds, ``n`` a count.
FIGURES: tuple[tuple[str, str, str], ...] = (
    ("accuracy_original", "avg@k original", "pct"),
    ("accuracy_blank", "avg@k blank", "pct"),
    ("accuracy_shuffled", "avg@k shuffled", "pct"),
    ("gap_blank", "gap original-blank", "pts"),
    ("gap_shuffled", "gap original-shuffled", "pts"),
    ("greedy_gap_blank", "greedy gap blank (end)", "pts"),
    ("greedy_gap_shuffled", "greedy gap shuffled (end)", "pts"),
    ("val_accuracy_start", "val/accuracy start", "pct"),
    ("val_accuracy_end", "val/accuracy end", "pct"),
    ("step_seconds", "step s", "s"),
    ("tokens_generated", "tokens generated", "n"),
    ("wall_seconds", "wall s", "s"),
)
CONFIDENCE = 0.95


def t_cdf_two_sided(t: float, df: int) -> float:
    """``P(|T| <= t)`` for Student's t with ``df`` (an integer >= 1) degrees of freedom.

    The closed forms of Abramowitz & Stegun 26.7.3 (odd ``df``) and 26.7.4 (even ``df``), with
    ``theta = atan(t / sqrt(df))``: a finite sum of powers of ``cos(theta)``, exact up to rounding.

    Args:
        t: A value >= 0.
        df: Degrees of freedom.

    Returns:
        The probability that ``|T| <= t``.
    """
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}.")
    theta = math.atan(t / math.sqrt(df))
    c, s = math.cos(theta), math.sin(theta)
    if df % 2:  # 26.7.3: 2/pi [theta + sin cos (1 + 2/3 cos^2 + (2 4)/(3 5) cos^4 + ...)]
        total, term = 0.0, c
        for k in range(1, (df - 1) // 2 + 1):
            total += term
            term *= c * c * (2 * k) / (2 * k + 1)
        return 2 / math.pi * (theta + s * total)
    # 26.7.4: sin (1 + 1/2 cos^2 + (1 3)/(2 4) cos^4 + ...), df / 2 terms
    total, term = 0.0, 1.0
    for k in range(1, df // 2 + 1):
        total += term
        term *= c * c * (2 * k - 1) / (2 * k)
    return s * total


def t_quantile(df: int, confidence: float = CONFIDENCE) -> float:
    """The ``t`` with ``P(|T| <= t) = confidence`` for ``df`` degrees of freedom (the two-sided
    quantile: 12.706 for df 1 and 95%), by bisection on :func:`t_cdf_two_sided`."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}.")
    low, high = 0.0, 1.0
    while t_cdf_two_sided(high, df) < confidence:
        high *= 2
    for _ in range(200):
        middle = (low + high) / 2
        if t_cdf_two_sided(middle, df) < confidence:
            low = middle
        else:
            high = middle
        if high - low < 1e-12 * high:
            break
    return (low + high) / 2


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Mean of ``values`` and its Student t interval: ``mean +- t(n-1) * sd / sqrt(n)`` with the
    sample (n - 1) standard deviation.

    Returns:
        ``{"mean", "low", "high", "half_width", "n", "values"}``; the interval's entries are None
        for fewer than two values (no spread to estimate), and everything but ``n`` and
        ``values`` is None for no value.
    """
    values = [float(v) for v in values]
    n = len(values)
    out: dict[str, Any] = {
        "mean": None,
        "low": None,
        "high": None,
        "half_width": None,
        "n": n,
        "values": values,
    }
    if n == 0:
        return out
    mean = statistics.fmean(values)
    out["mean"] = mean
    if n >= 2:
        half = t_quantile(n - 1, confidence) * statistics.stdev(values) / math.sqrt(n)
        out.update(low=mean - half, high=mean + half, half_width=half)
    return out


def aggregate(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method, the seeds and a :func:`t_interval` of every figure over its finished runs
    (a run whose figure is None, e.g. a run that logged no greedy gap, is left out of that
    figure). Methods keep the order of their first record.

    Args:
        records: Run records with ``method``, ``seed``, ``status`` and ``figures``.

    Returns:
        ``{method: {"seeds": [...], "figures": {name: t_interval(...)}}}``.
    """
    by_method: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        if record.get("status") == "finished":
            by_method.setdefault(record["method"], []).append(record)
    result: dict[str, dict[str, Any]] = {}
    for method, runs in by_method.items():
        runs = sorted(runs, key=lambda r: r["seed"])
        names = [key for key, _, _ in FIGURES] + sorted(
            {k for r in runs for k in r["figures"]} - {key for key, _, _ in FIGURES}
        )
        figures = {
            name: t_interval([r["figures"][name] for r in runs if _finite(r["figures"].get(name))])
            for name in names
        }
        result[method] = {"seeds": [r["seed"] for r in runs], "figures": figures}
    return result


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def format_value(value: float | None, kind: str) -> str:
    """One figure as shown in the tables: ``-`` for none, percent for ``pct``, signed percentage
    points for ``pts``, seconds with 3 significant digits for ``s``, an integer for ``n``."""
    if not _finite(value):
        return "-"
    assert value is not None
    if kind == "pct":
        return f"{100 * value:.1f}"
    if kind == "pts":
        return f"{100 * value:+.1f}"
    if kind == "s":
        return f"{value:.3g}"
    return f"{value:.0f}"


def format_interval(summary: dict[str, Any], kind: str) -> str:
    """A :func:`t_interval` as ``mean [low, high]`` (the mean alone for one seed)."""
    mean = format_value(summary["mean"], kind)
    if summary["half_width"] is None:
        return mean
    return f"{mean} [{format_value(summary['low'], kind)}, {format_value(summary['high'], kind)}]"


def runs_table(records: Sequence[dict[str, Any]], samples: int) -> str:
    """The per-run table: avg@k under each condition with its 95% interval over prompts, the
    gaps, the Evaluation callback's last greedy gaps, val/accuracy, step time, tokens, wall time."""
    header = (
        f"| method | seed | avg@{samples} original [95% CI] | avg@{samples} blank | "
        f"avg@{samples} shuffled | gap blank | gap shuffled | greedy gap blank / shuffled (end) "
        "| val/accuracy start -> end | step s | tokens | wall s | run |"
    )
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in records:
        if r.get("status") != "finished":
            lines.append(f"| {r['method']} | {r['seed']} | {r.get('status', '?')} |" + " |" * 10)
            continue
        f = r["figures"]
        original, blank, shuffled = (
            _accuracy_cell(r.get("eval", {}).get(c) or {})
            for c in ("original", "blank", "shuffled")
        )

        greedy = " / ".join(
            format_value(f.get(k), "pts") for k in ("greedy_gap_blank", "greedy_gap_shuffled")
        )
        lines.append(
            f"| {r['method']} | {r['seed']} | {original} | {blank} | "
            f"{shuffled} | {format_value(f.get('gap_blank'), 'pts')} | "
            f"{format_value(f.get('gap_shuffled'), 'pts')} | {greedy} | "
            f"{format_value(f.get('val_accuracy_start'), 'pct')} -> "
            f"{format_value(f.get('val_accuracy_end'), 'pct')} | "
            f"{format_value(f.get('step_seconds'), 's')} | "
            f"{format_value(f.get('tokens_generated'), 'n')} | "
            f"{format_value(f.get('wall_seconds'), 's')} | {_run_cell(r)} |"
        )
    return "\n".join(lines) + "\n"


def _run_cell(record: dict[str, Any]) -> str:
    """Where the run is: its version folder, or for an archived run (its folder is not there)
    ``archived`` and the commit that made it, when recorded (``+`` for changed tracked files)."""
    if not record.get("archived"):
        return str(record.get("log_dir", ""))
    code = record.get("code") or {}
    if not code.get("commit"):
        return "archived"
    return f"archived, made at {code['commit'][:7]}{'+' if code.get('dirty') else ''}"


def _accuracy_cell(entry: dict[str, Any]) -> str:
    """``accuracy [low-high]`` of one condition of ``cppo evaluate``'s results."""
    low, high = entry.get("ci95") or (None, None)
    return (
        f"{format_value(entry.get('accuracy'), 'pct')} "
        f"[{format_value(low, 'pct')}-{format_value(high, 'pct')}]"
    )


def methods_table(methods: dict[str, dict[str, Any]], samples: int) -> str:
    """One row per method: seeds, then each figure of :data:`FIGURES` as mean [95% t-interval]."""
    labels = [label.replace("avg@k", f"avg@{samples}") for _, label, _ in FIGURES]
    lines = [
        "| method | seeds | " + " | ".join(labels) + " |",
        "|---|---|" + "---:|" * len(FIGURES),
    ]
    for method, summary in methods.items():
        cells = [format_interval(summary["figures"][key], kind) for key, _, kind in FIGURES]
        seeds = " ".join(str(s) for s in summary["seeds"])
        lines.append(f"| {method} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def greedy_sets(methods: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    """The (set, image condition) pairs of the Evaluation callback's greedy figures
    (``greedy/<set>/<images>/accuracy_last``) any method has, in sorted order."""
    pairs = {
        tuple(name.split("/")[1:3])
        for summary in methods.values()
        for name in summary["figures"]
        if name.startswith("greedy/") and name.endswith("/accuracy_last")
    }
    return sorted(pairs)  # type: ignore[arg-type]


def greedy_table(methods: dict[str, dict[str, Any]]) -> str:
    """One row per method and greedy set: per image condition, the accuracy before any update
    -> at the end, and the change with its 95% t-interval over seeds; then the gaps' change.
    Empty when no run logged greedy figures."""
    pairs = greedy_sets(methods)
    if not pairs:
        return ""
    images = sorted({c for _, c in pairs}, key=lambda c: (c != "original", c))
    header = "| method | set | " + " | ".join(f"{c} start -> end | {c} change" for c in images)
    gaps = [c for c in images if c != "original"]
    header += "".join(f" | gap {c} start -> end | gap {c} change" for c in gaps) + " |"
    lines = [header, "|---|---|" + "---:|" * (2 * len(images) + 2 * len(gaps))]
    for method, summary in methods.items():
        figures = summary["figures"]
        for name in sorted({s for s, _ in pairs}):
            cells = []
            for c in images:
                cells += _change_cells(figures, f"greedy/{name}/{c}/accuracy", "pct")
            for c in gaps:
                cells += _change_cells(figures, f"greedy/{name}/{c}/gap", "pts")
            if all(cell in ("-", "- -> -") for cell in cells):
                continue
            lines.append(f"| {method} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _change_cells(figures: dict[str, Any], key: str, kind: str) -> list[str]:
    empty = t_interval([])
    start = format_value(figures.get(f"{key}_first", empty)["mean"], kind)
    end = format_value(figures.get(f"{key}_last", empty)["mean"], kind)
    return [f"{start} -> {end}", format_interval(figures.get(f"{key}_change", empty), "pts")]


def to_markdown(study: dict[str, Any]) -> str:
    """``study.md``: the settings in one paragraph, the per-method table, the per-run table and
    the runs that failed (with their logs)."""
    s = study["settings"]
    k = s["samples"]
    lines = [
        "# Study",
        "",
        f"Configs: {', '.join('`' + c['path'] + '`' for c in s['configs'])}; methods: "
        f"{', '.join(study['methods'])}; pass-through flags: "
        f"{' '.join(f'`{a}`' for a in s['pass_through']) or 'none'}.",
        f"Held-out: `{s['eval_set']['value']}`, avg@{k} at temperature {s['temperature']:g} "
        "under the original, blank and shuffled images; the 95% interval of one run is over "
        "prompts (normal approximation, from `cppo evaluate`), of a method over seeds "
        "(Student t). Gaps are accuracy under the original images minus under the other; "
        "greedy gaps are the last logged by the Evaluation callback during training. Percent "
        "and percentage points.",
        "",
        "## Per method (mean over seeds [95% t-interval])",
        "",
        methods_table(study["per_method"], k),
    ]
    greedy = greedy_table(study["per_method"])
    if greedy:
        lines += [
            "## Greedy accuracy during training (Evaluation callback; mean over seeds)",
            "",
            "Start is before the first update, end the last evaluation; change is end minus "
            "start in percentage points with its 95% t-interval over seeds.",
            "",
            greedy,
        ]
    lines += [
        "## Per run",
        "",
        runs_table(study["runs"], k),
    ]
    failed = [r for r in study["runs"] if r.get("status") != "finished"]
    if failed:
        lines += ["## Not finished", ""]
        lines += [
            f"- {r['method']} seed {r['seed']}: {r.get('status')} ({r.get('error', '')}); log: "
            f"{r.get('log', '-')}"
            for r in failed
        ]
        lines.append("")
    return "\n".join(lines)


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
