"""One run of a study on disk: its folder's state, its TensorBoard scalars, its record.

A run's folder is ``<output>/runs/<method>-seed<seed>``, the ``trainer.default_root_dir`` of its
``cppo fit``: each attempt writes a ``lightning_logs/version_N`` of its own, and the policy it
exports at the end (``hf_policy/``) is scored by ``cppo evaluate`` into ``version_N/eval``. The run
is finished once ``run.json`` (its record, written last and atomically) is there.

A run folder that holds only its ``run.json`` (no ``lightning_logs/``: a study archived with
``cppo study --archive``, or copied without its checkpoints, policies and logs) is an *archived*
run: finished, its record taken as written (its curves and figures are in it), since there is
nothing to rebuild it from.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
from pathlib import Path
from typing import Any

import yaml

RECORD = "run.json"
FIT_LOG = "fit.log"
EVAL_LOG = "evaluate.log"
EVAL_DIR = "eval"
POLICY = "hf_policy"
CONDITIONS = ("original", "blank", "shuffled")
Series = list[tuple[int, float]]
_VERSION = re.compile(r"version_(\d+)$")
#: Tags that are no curve of the run: TensorBoardLogger writes ``hp_metric`` -1 at step 0 in
#: every version folder, a resumed one too.
IGNORED = frozenset({"hp_metric"})


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def versions(run_dir: Path) -> list[Path]:
    """The run's ``lightning_logs/version_N`` folders, by N."""
    logs = run_dir / "lightning_logs"
    found = [(int(m.group(1)), p) for p in logs.glob("version_*") if (m := _VERSION.match(p.name))]
    return [p for _, p in sorted(found)]


def attempts(run_dir: Path) -> list[Path]:
    """The version folders in which a ``cppo fit`` started training (that wrote TensorBoard
    events), by N; a folder claimed by a run refused before it logged anything is not one."""
    return [v for v in versions(run_dir) if any(v.glob("events.out.tfevents.*"))]


def fitted_version(run_dir: Path) -> Path | None:
    """The version folder of the run's finished fit: the newest attempt, when it exported its
    policy; None when the newest attempt was cut (or none started)."""
    tried = attempts(run_dir)
    if tried and (tried[-1] / POLICY / "config.json").is_file():
        return tried[-1]
    return None


def resume_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint a cut run resumes from: the newest (by modification time) ``last.ckpt``,
    ``interrupted-step=*.ckpt`` (Ctrl-C) or ``preempted-step=*.ckpt`` (SIGTERM) in its version
    folders' ``checkpoints/``; None when there is none (the run starts again)."""
    found = [
        path
        for version in versions(run_dir)
        for pattern in ("last.ckpt", "interrupted-step=*.ckpt", "preempted-step=*.ckpt")
        for path in (version / "checkpoints").glob(pattern)
        if path.is_file()
    ]
    return max(found, key=lambda p: (p.stat().st_mtime, _number(p.parent.parent)), default=None)


def read_record(run_dir: Path) -> dict[str, Any] | None:
    """The run's record when it finished (its policy and its evaluation results still there, or
    the run archived: ``archived`` True, see the module's docstring); None otherwise. Its paths
    are made those of ``run_dir``, wherever the study folder was when the record was written (a
    moved study is still finished)."""
    path = run_dir / RECORD
    try:
        record = json.loads(path.read_text())
        log_dir = run_dir / "lightning_logs" / Path(record["log_dir"]).name
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if record.get("status") != "finished":
        return None
    archived = not (run_dir / "lightning_logs").exists()
    if archived and not (isinstance(record.get("figures"), dict) and "curves" in record):
        return None  # not a record build_record wrote: nothing to report from
    done = (log_dir / POLICY / "config.json").is_file() and (
        log_dir / EVAL_DIR / "results.json"
    ).is_file()
    if not (done or archived):
        return None
    logs = run_dir / "lightning_logs"
    return {
        **record,
        "run_dir": str(run_dir),
        "log_dir": str(log_dir),
        "policy": str(log_dir / POLICY),
        "eval_dir": str(log_dir / EVAL_DIR),
        "attempts": [str(logs / Path(a).name) for a in record.get("attempts", [])],
        "archived": archived,
    }


def read_scalars(folder: Path) -> dict[str, Series]:
    """Every scalar of one TensorBoard log folder but :data:`IGNORED`: tag -> [(step, value)] by
    step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: sorted((e.step, e.value) for e in events.Scalars(tag))
        for tag in events.Tags()["scalars"]
        if tag not in IGNORED
    }


def merge_attempts(logs: list[dict[str, Series]]) -> dict[str, Series]:
    """The curves of a run made of several attempts (oldest first): each attempt replaces what
    the earlier ones logged from its first step on (a resumed attempt starts at its checkpoint's
    step and redoes the steps after it; a restarted one starts at 0 and replaces everything)."""
    merged: dict[str, Series] = {}
    for log in logs:
        steps = [step for series in log.values() for step, _ in series]
        if not steps:
            continue
        start = min(steps)
        merged = {tag: [(s, v) for s, v in series if s < start] for tag, series in merged.items()}
        for tag, series in log.items():
            merged[tag] = merged.get(tag, []) + list(series)
    return {tag: series for tag, series in merged.items() if series}


def run_scalars(run_dir: Path, last: Path) -> dict[str, Series]:
    """The run's curves: its attempts up to ``last`` (the version folder it finished in), merged
    by :func:`merge_attempts`."""
    chain = [v for v in attempts(run_dir) if _number(v) <= _number(last)]
    return merge_attempts([read_scalars(v) for v in chain])


def _number(version: Path) -> int:
    match = _VERSION.match(version.name)
    return int(match.group(1)) if match else -1


def responses_per_batch(config_file: Path) -> int | None:
    """Responses sampled per rollout batch by the run (``data.batch_size x rollout.group_size x
    devices x nodes``, devices counted when they are a number), from its ``config.yaml``."""
    try:
        config = yaml.safe_load(config_file.read_text()) or {}
        batch = int(config["data"]["batch_size"]) * int(config["rollout"]["group_size"])
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return None
    trainer = config.get("trainer") or {}
    for key in ("devices", "num_nodes"):
        if isinstance(trainer.get(key), int) and trainer[key] > 0:
            batch *= trainer[key]
    return batch


def last(series: Series | None) -> float | None:
    return series[-1][1] if series else None


def first(series: Series | None) -> float | None:
    """The value at step 0, the measurement before any update; None when the run has none (an
    attempt cut before its first validation and resumed from step 0 skips it), rather than a
    later value that would pass for the start."""
    return series[0][1] if series and series[0][0] == 0 else None


def step_seconds(scalars: dict[str, Series]) -> float | None:
    """Median over the logged rollout batches of ``rollout/seconds + train/update_seconds`` (the
    update time alone when the rollout time is not logged)."""
    update = dict(scalars.get("train/update_seconds", []))
    if not update:
        return None
    rollout = dict(scalars.get("rollout/seconds", []))
    return statistics.median(value + rollout.get(step, 0.0) for step, value in update.items())


def tokens_generated(scalars: dict[str, Series], per_batch: int | None) -> float | None:
    """Response tokens sampled in training rollouts: the sum over logged rollout batches of
    ``rollout/response_length`` (mean per response) times the responses per batch. With
    ``trainer.log_every_n_steps`` > 1 only the logged batches are counted."""
    lengths = scalars.get("rollout/response_length")
    if not lengths or not per_batch:
        return None
    return sum(value for _, value in lengths) * per_batch


def greedy_tags(scalars: dict[str, Series]) -> dict[str, str]:
    """The Evaluation callback's tags of the first evaluation set: condition -> its
    ``eval/<set>/<condition>/`` prefix (empty when the run logged none)."""
    sets = sorted({tag.split("/")[1] for tag in scalars if re.match(r"eval/[^/]+/[^/]+/", tag)})
    if not sets:
        return {}
    prefixes = {c: f"eval/{sets[0]}/{c}/" for c in CONDITIONS}
    return {c: p for c, p in prefixes.items() if f"{p}accuracy" in scalars}


GREEDY_TAG = re.compile(r"eval/(?P<set>[^/]+)/(?P<images>[^/]+)/accuracy")


def greedy_figures(scalars: dict[str, Series]) -> dict[str, float | None]:
    """The Evaluation callback's greedy figures of every set and image condition it logged, as
    ``greedy/<set>/<images>/<figure>``: ``accuracy_first`` (at step 0, the policy before any
    update; None when the run logged none there), ``accuracy_last``, ``accuracy_change`` (last
    minus first), and for conditions with a gap ``gap_first``, ``gap_last`` and ``gap_change``."""
    figures: dict[str, float | None] = {}
    for tag in sorted(scalars):
        match = GREEDY_TAG.fullmatch(tag)
        if not match:
            continue
        prefix = f"eval/{match['set']}/{match['images']}/"
        for name in ("accuracy", "gap"):
            series = scalars.get(prefix + name)
            if series is None:
                continue
            start, end = first(series), last(series)
            key = f"greedy/{match['set']}/{match['images']}/{name}"
            figures[f"{key}_first"] = start
            figures[f"{key}_last"] = end
            figures[f"{key}_change"] = None if start is None or end is None else end - start
    return figures


def evaluation(results_file: Path) -> dict[str, Any]:
    """The ``cppo evaluate`` results of the run's policy: its benchmark and, per condition,
    ``accuracy`` (avg@k), ``ci95`` (over prompts), ``std`` (over sample sets), ``gap``."""
    payload = json.loads(results_file.read_text())
    results = payload["results"]
    benchmark = results[0]["benchmark"]
    return {
        "benchmark": benchmark,
        "k": payload["samples"],
        "conditions": {
            r["images"]: {key: r.get(key) for key in ("accuracy", "ci95", "std", "gap", "n")}
            for r in results
            if r["benchmark"] == benchmark
        },
    }


def code_version() -> dict[str, Any] | None:
    """The commit of the checkout this package runs from and whether tracked files differ from it
    (``{"commit": sha, "dirty": bool}``); None when it is not a git checkout (an installed wheel)
    or git is not there. A study continued over weeks records which code made each run."""
    import subprocess

    from cppo_lightning.study.settings import repo_root

    root = str(repo_root())
    try:
        commit = subprocess.run(
            ["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30
        )
        changes = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode != 0 or changes.returncode != 0:
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(changes.stdout.strip())}


def build_record(
    method: str,
    seed: int,
    run_dir: Path,
    log_dir: Path,
    wall_seconds: float | None,
    code: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The record of a finished run: where it is, its evaluation, its curves and its figures
    (the flat mapping :mod:`cppo_lightning.study.report` aggregates), and ``code``, the
    :func:`code_version` that made it."""
    scalars = run_scalars(run_dir, log_dir)
    ev = evaluation(log_dir / EVAL_DIR / "results.json")
    conditions = ev["conditions"]
    tags = greedy_tags(scalars)
    curves = {"val/accuracy": scalars.get("val/accuracy", [])}
    for tag in sorted(scalars):  # the greedy curves of every set and condition
        match = GREEDY_TAG.fullmatch(tag)
        if match:
            curves[tag] = scalars[tag]
            gap = tag[: -len("accuracy")] + "gap"
            if match["images"] != "original" and gap in scalars:
                curves[gap] = scalars[gap]
    greedy = {
        c: {
            "accuracy_first": first(scalars.get(f"{p}accuracy")),
            "accuracy_last": last(scalars.get(f"{p}accuracy")),
            "gap_first": first(scalars.get(f"{p}gap")),
            "gap_last": last(scalars.get(f"{p}gap")),
        }
        for c, p in tags.items()
    }
    val = scalars.get("val/accuracy")
    figures: dict[str, float | None] = {
        **{f"accuracy_{c}": (conditions.get(c) or {}).get("accuracy") for c in CONDITIONS},
        **{f"gap_{c}": (conditions.get(c) or {}).get("gap") for c in CONDITIONS[1:]},
        **{f"greedy_gap_{c}": (greedy.get(c) or {}).get("gap_last") for c in CONDITIONS[1:]},
        "val_accuracy_start": first(val),
        "val_accuracy_end": last(val),
        "step_seconds": step_seconds(scalars),
        "tokens_generated": tokens_generated(scalars, responses_per_batch(log_dir / "config.yaml")),
        "wall_seconds": wall_seconds,
        **greedy_figures(scalars),
    }
    figures = {k: (v if v is None or math.isfinite(v) else None) for k, v in figures.items()}
    return {
        "method": method,
        "seed": seed,
        "status": "finished",
        "run_dir": str(run_dir),
        "log_dir": str(log_dir),
        "policy": str(log_dir / POLICY),
        "eval_dir": str(log_dir / EVAL_DIR),
        "attempts": [str(v) for v in attempts(run_dir)],
        "eval": conditions,
        "eval_benchmark": ev["benchmark"],
        "greedy": greedy,
        "val_accuracy": {"start": first(val), "end": last(val)},
        "step_seconds": figures["step_seconds"],
        "tokens_generated": figures["tokens_generated"],
        "wall_seconds": wall_seconds,
        "code": code,
        "curves": {tag: [[s, v] for s, v in series] for tag, series in curves.items()},
        "figures": figures,
    }


def refreshed(record: dict[str, Any]) -> dict[str, Any]:
    """A finished run's record (:func:`read_record`) rebuilt from its logs and evaluation, so that
    a report shows every figure the study code now computes, also for runs finished before a
    figure was added; its wall time, measured only while it ran, is kept. An archived run's
    record is returned as it is: its logs are not there."""
    if record.get("archived"):
        return record
    return build_record(
        record["method"],
        record["seed"],
        Path(record["run_dir"]),
        Path(record["log_dir"]),
        record.get("wall_seconds"),
        record.get("code"),
    )
