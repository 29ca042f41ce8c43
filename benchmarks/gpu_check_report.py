"""The figures, table and comparison of benchmarks/gpu_check.py's JSON report.

A report: ``{"schema", "created", "command", "tiny", "model", "environment": {"device",
"python", "torch", "transformers", "lightning", "peft", "git_commit", "git_dirty"}, "parts":
{PART: {"status", "message", "seconds", "settings", "figures", "log", ...}}, "checks": [{"name",
"value", "tolerance", "passed"}]}``. Every part is present whatever ran (``status``: ok, failed,
timeout, oom, error, skipped or not-selected); a fit part's ``figures`` has every key of
:data:`FIGURES` (None where not measured).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

FIGURES = (
    "generate_tokens_per_s",  # response tokens / seconds in the rollout engine's sample
    "generate_s",
    "views_s",  # drawing and encoding I+ and I- (the DataModule's on_after_batch_transfer)
    "logp_s",  # reference and old log-probs (prepare_update)
    "update_s",  # the training step without logp_s: policy + I+ + I-, optimizer steps
    "step_s",
    "rollout_s",  # rollout/seconds as logged: generation, decoding, rewards
    "peak_gib",  # CUDA peak allocated (on a CPU: the process's peak resident memory)
    "generate_peak_gib",
    "views_peak_gib",
    "logp_peak_gib",
    "update_peak_gib",
    "logp_mismatch",  # rollout/logp_mismatch as logged
    "response_length",  # rollout/response_length as logged: the forced length
    "trainable_parameters",
    "rollout_batches_timed",  # timings are means over these (the first dropped if more ran)
)
# rollout/logp_mismatch, mean |sampler log-prob - training log-prob| per token, by precision.
MISMATCH_TOLERANCE = {"bf16-mixed": 5e-2, "32-true": 1e-4}


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def fit_figures(phases: Path, root: Path) -> dict[str, Any]:
    """A fit part's figures, from PhaseTimer's lines in ``phases`` and the TensorBoard scalars of
    the run under ``root``, plus ``device``. Timings leave out the first rollout batch when more
    than one finished (warm-up) and use the calls a cut run got through when none did; peaks are
    over every call."""
    from benchmarks.step_time import _scalars

    figures: dict[str, Any] = dict.fromkeys(FIGURES)
    lines = phases.read_text().splitlines() if phases.exists() else []
    records = [json.loads(line) for line in lines if line.strip()]
    start = next((r for r in records if r["event"] == "start"), {})
    figures["trainable_parameters"] = start.get("trainable_parameters")
    figures["device"] = start.get("device")
    calls = [r for r in records if r["event"] == "phase"]
    finished = sorted({r["batch"] for r in records if r["event"] == "batch_end"})
    timed = finished[1:] if len(finished) > 1 else finished
    figures["rollout_batches_timed"] = len(timed)
    for phase in ("generate", "views", "logp", "update", "step"):
        mine = [r for r in calls if r["phase"] == phase]
        chosen = [r for r in mine if r["batch"] in timed] or mine
        batches = sorted({r["batch"] for r in chosen})
        figures[f"{phase}_s"] = _mean(
            sum(r["seconds"] for r in chosen if r["batch"] == b) for b in batches
        )
        if f"{phase}_peak_gib" in figures:
            figures[f"{phase}_peak_gib"] = max(
                (r["peak_gib"] for r in mine if r["peak_gib"] is not None), default=None
            )
    generated = [r for r in calls if r["phase"] == "generate"]
    generated = [r for r in generated if r["batch"] in timed] or generated
    if generated:
        seconds = sum(r["seconds"] for r in generated)
        figures["generate_tokens_per_s"] = sum(r["tokens"] for r in generated) / seconds
    if figures["step_s"] is not None and figures["logp_s"] is not None:
        figures["update_s"] = figures["step_s"] - figures["logp_s"]
    peaks = [r["peak_gib"] for r in calls if r["peak_gib"] is not None]
    figures["peak_gib"] = max(peaks or [r["rss_gib"] for r in calls], default=None)
    events = sorted(root.rglob("events.out.*"))
    if events:
        log_dir = str(events[-1].parent)
        for key, tag in (
            ("rollout_s", "rollout/seconds"),
            ("logp_mismatch", "rollout/logp_mismatch"),
            ("response_length", "rollout/response_length"),
        ):
            values = _scalars(log_dir, tag)  # one per rollout batch
            figures[key] = _mean(values[1:] if len(values) > 1 else values)
    return figures


def mismatch_checks(report: dict[str, Any]) -> list[dict[str, Any]]:
    """``rollout/logp_mismatch`` of every part that logged it, against the tolerance of its
    precision."""
    checks = []
    for part, row in report["parts"].items():
        value = (row["figures"] or {}).get("logp_mismatch")
        if value is not None:
            precision = row["settings"]["precision"]
            tolerance = MISMATCH_TOLERANCE[precision]
            checks.append(
                {
                    "name": f"rollout/logp_mismatch of {part} ({precision})",
                    "value": value,
                    "tolerance": tolerance,
                    "passed": bool(value <= tolerance),
                }
            )
    return checks


def write(report: dict[str, Any], output: Path) -> None:
    """Write ``report`` whole or not at all (a reader never sees half a file)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_name(output.name + ".tmp")
    temporary.write_text(json.dumps(report, indent=2) + "\n")
    temporary.replace(output)


def _cell(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.{digits}g}" if 0 < abs(value) < 1e-2 else f"{value:,.{digits}f}"
    return str(value)


def table(report: dict[str, Any]) -> str:
    """The report as Markdown: a header line, the parts, the checks."""
    env = report["environment"]
    commit = str(env["git_commit"])[:10] + (" with local changes" if env["git_dirty"] else "")
    lines = [
        f"device: {env['device']}; torch {env['torch']}, transformers {env['transformers']}, "
        f"lightning {env['lightning']}, peft {env['peft']}; commit {commit}; "
        f"model {report['model']}",
        "",
        "| part | status | B x G x L | batches timed | generate tok/s | generate s | views s "
        "| ref/old logp s | update s | peak GiB (generate / logp / update) | logp mismatch "
        "| wall s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for part, row in report["parts"].items():
        s, f = row["settings"], row["figures"] or {}
        shape = f"{s['prompts']} x {s['group_size']} x {s['new_tokens']}" if "prompts" in s else ""
        status = row["status"] + (f": {row['message']}" if row["message"] else "")
        peaks = " / ".join(
            _cell(f.get(k), 1) for k in ("generate_peak_gib", "logp_peak_gib", "update_peak_gib")
        )
        peak = f"{_cell(f.get('peak_gib'), 1)} ({peaks})" if f else "-"
        lines.append(
            f"| {part} | {status} | {shape} | {_cell(f.get('rollout_batches_timed'))} | "
            f"{_cell(f.get('generate_tokens_per_s'), 0)} | {_cell(f.get('generate_s'))} | "
            f"{_cell(f.get('views_s'), 3)} | {_cell(f.get('logp_s'))} | {_cell(f.get('update_s'))} "
            f"| {peak} | {_cell(f.get('logp_mismatch'), 6)} | {_cell(row['seconds'], 0)} |"
        )
    if report["checks"]:
        lines += ["", "| check | value | tolerance | result |", "|---|---:|---:|---|"]
        for c in report["checks"]:
            verdict = "pass" if c["passed"] else "**FAIL**"
            lines.append(f"| {c['name']} | {c['value']:.3g} | {c['tolerance']:g} | {verdict} |")
    return "\n".join(lines)


def compare(old: dict[str, Any], new: dict[str, Any]) -> str:
    """What differs from ``old`` to ``new``: environment, statuses, the figures both measured
    (with their ratio) and the checks."""
    env = [
        f"{key}: {old['environment'].get(key)} -> {value}"
        for key, value in new["environment"].items()
        if old["environment"].get(key) != value
    ]
    lines = ["| part | figure | old | new | new / old |", "|---|---|---:|---:|---:|"]
    for part, b in new["parts"].items():
        a = old["parts"].get(part, {})
        if a.get("status") != b["status"]:
            lines.append(f"| {part} | status | {a.get('status')} | {b['status']} | |")
        fa, fb = a.get("figures") or {}, b["figures"] or {}
        for key in FIGURES:
            x, y = fa.get(key), fb.get(key)
            if x is not None and y is not None and x != y:
                ratio = f"{y / x:.2f}" if x else ""
                lines.append(f"| {part} | {key} | {_cell(x, 3)} | {_cell(y, 3)} | {ratio} |")
    before = {c["name"]: c for c in old.get("checks", [])}
    for c in new.get("checks", []):
        was = before.get(c["name"])
        if was is None or (was["value"], was["passed"]) != (c["value"], c["passed"]):
            old_value = "-" if was is None else f"{was['value']:.3g} ({_verdict(was)})"
            lines.append(
                f"| checks | {c['name']} | {old_value} | {c['value']:.3g} ({_verdict(c)}) | |"
            )
    return "\n".join([*env, *lines])


def _verdict(check: dict[str, Any]) -> str:
    return "pass" if check["passed"] else "FAIL"
