"""Reading the responses back and writing the results: JSON (the schema users' scripts read), CSV,
a Markdown table, TensorBoard scalars.

``responses.jsonl`` is only ever appended to, one whole line per response, under a file lock (ranks
of one node share it). A process killed in the middle of a write leaves a cut last line: it is
ignored when the file is read back and cut off (said on stderr) before the next append, so the
next record starts on a line of its own. A line that does not parse anywhere else was not cut by
a kill: the file is refused, naming the line. A response written twice (a unit redone after an
interruption) counts once. Result files are written to a temporary name and renamed, so a reader
never sees half a file.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import math
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from cppo_lightning.evaluation.engine import EvalUnit, PreparedSet, answer_key
from cppo_lightning.evaluation.metrics import NO_REFERENCE, ConditionStats, majority_answer

RESPONSES = "responses.jsonl"
Key = tuple[str, str, str, int]  # (benchmark, images, prompt_id, sample)


def append_records(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Append records as JSON lines, in one write under an exclusive lock, after cutting off a
    last line that a killed write left unfinished (:func:`drop_cut_last_line`)."""
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    if not data:
        return
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        drop_cut_last_line(fd, path)
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)  # closing releases the lock


def drop_cut_last_line(fd: int, path: Path) -> None:
    """Truncate the file open as ``fd`` (read-write, locked) to its last whole line when its
    last line lacks its newline or is not a response record: the fragment of a write that was
    killed (appending after it would glue the next record onto it and lose both)."""
    size = os.fstat(fd).st_size
    if size == 0:
        return
    start = _last_line_start(fd, size)
    line = os.pread(fd, size - start, start)
    if line.endswith(b"\n") and _parse(line) is not None:
        return
    os.ftruncate(fd, start)
    print(
        f"{path}: dropped its cut last line ({len(line)} bytes from an interrupted write; the "
        "unit it belonged to is scored again).",
        file=sys.stderr,
        flush=True,
    )


def _last_line_start(fd: int, size: int) -> int:
    """The offset where the last line of the file open as ``fd`` (``size`` bytes) starts."""
    position = size - 1  # the last byte is the last line's own newline when it has one
    while position > 0:
        begin = max(0, position - (1 << 16))
        newline = os.pread(fd, position - begin, begin).rfind(b"\n")
        if newline >= 0:
            return begin + newline + 1
        position = begin
    return 0


def _parse(line: bytes) -> tuple[Key, dict[str, Any]] | None:
    """A line's key and record; None if it is not a whole response record."""
    try:
        record = json.loads(line)
        key = (
            record["benchmark"],
            record["images"],
            str(record["prompt_id"]),
            int(record["sample"]),
        )
    except (ValueError, KeyError, TypeError):  # JSONDecodeError and UnicodeDecodeError too
        return None
    return key, record


def read_records(path: Path) -> dict[Key, dict[str, Any]]:
    """The records of ``responses.jsonl`` by key (the first of duplicates); a missing file is
    empty. A last line without its newline, or that is not a record, is the fragment of a killed
    write and is skipped.

    Raises:
        ValueError: Another line is not a record (the file was damaged or edited), naming it.
    """
    records: dict[Key, dict[str, Any]] = {}
    if not path.is_file():
        return records
    bad: int | None = None  # a line that did not parse: fatal unless it is the last
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, 1):
            if bad is not None:
                raise ValueError(
                    f"{path}: line {bad} is not a whole response record (JSON with benchmark, "
                    "images, prompt_id and sample), and it is not the last line, so it is not "
                    "a write cut by a kill: the file was damaged or edited. Delete that line "
                    "(the responses it held are scored again) or use another --output."
                )
            parsed = _parse(line) if line.endswith(b"\n") else None
            if parsed is None:
                bad = number
                continue
            key, record = parsed
            records.setdefault(key, record)
    return records


def unit_done(unit: EvalUnit, prepared: PreparedSet, samples: int, done: set[Key]) -> bool:
    """Whether every response of ``unit`` is already in ``done``."""
    ids = prepared.rows.select(list(unit.rows))["prompt_id"] if unit.rows else []
    return all(
        (unit.benchmark, unit.condition, pid, s) in done for pid in ids for s in range(samples)
    )


def accumulate(
    prepared: PreparedSet,
    conditions: Sequence[str],
    samples: int,
    records: dict[Key, dict[str, Any]],
    rows: Iterable[int] | None = None,
) -> dict[str, ConditionStats]:
    """The sums of each condition over the prompts ``rows`` of one set (all when None).

    Raises:
        ValueError: A response of those prompts is missing.
    """
    ids = prepared.rows["prompt_id"]
    categories = prepared.rows["category"]
    rows = range(len(ids)) if rows is None else list(rows)
    stats: dict[str, ConditionStats] = {}
    reference: dict[int, str | None] = {}  # row -> majority answer under original
    # The original condition first, so that the others can be compared with it.
    for condition in sorted(conditions, key=lambda c: c != "original"):
        summed = stats[condition] = ConditionStats(samples, prepared.categories)
        for row in rows:
            pid = ids[row]
            got = [records.get((prepared.name, condition, pid, s)) for s in range(samples)]
            if any(r is None for r in got):
                raise ValueError(
                    f"{prepared.name}/{condition}: prompt {pid!r} lacks responses: the "
                    "evaluation has not finished (run the same command again to finish it)."
                )
            vote = majority_answer([answer_key(r["answer"]) for r in got])  # type: ignore[index]
            if condition == "original":
                reference[row] = vote
            summed.add(
                [r["correct"] for r in got],  # type: ignore[index]
                [r["format"] for r in got],  # type: ignore[index]
                [r["length"] for r in got],  # type: ignore[index]
                category=categories[row] or None,
                majority=vote,
                reference=reference.get(row, NO_REFERENCE),
            )
    return stats


def summarize(
    sets: Sequence[PreparedSet],
    conditions: Sequence[str],
    samples: int,
    records: dict[Key, dict[str, Any]],
) -> list[dict[str, Any]]:
    """One result per (set, condition), in the order given: the schema's figures plus ``gap``
    (accuracy under ``original`` minus this one's), ``dropped`` (reasons and counts), ``rows``
    and, for ``shuffled``, ``resized`` (prompts shown another row's image resized to theirs).

    Raises:
        ValueError: A response is missing (the evaluation has not finished).
    """
    results = []
    for prepared in sets:
        stats = accumulate(prepared, conditions, samples, records)
        results += results_of(prepared, conditions, stats)
    return results


def results_of(
    prepared: PreparedSet, conditions: Sequence[str], stats: dict[str, ConditionStats]
) -> list[dict[str, Any]]:
    """The results of one set from its (possibly rank-reduced) sums, conditions in order."""
    entries = [result_entry(prepared, condition, stats[condition]) for condition in conditions]
    _add_gaps(entries)
    return entries


def result_entry(prepared: PreparedSet, condition: str, stats: ConditionStats) -> dict[str, Any]:
    """The result of one (set, condition) from its sums."""
    entry: dict[str, Any] = {"benchmark": prepared.name, "images": condition, **stats.summary()}
    if condition == "original":
        entry["answer_kept"] = None
    entry["rows"] = prepared.report.rows
    entry["dropped"] = dict(prepared.report)
    if condition == "shuffled":
        entry["resized"] = int(sum(prepared.resized))
    return entry


def _add_gaps(results: list[dict[str, Any]]) -> None:
    original = next((r for r in results if r["images"] == "original"), None)
    for result in results:
        result["gap"] = (
            original["accuracy"] - result["accuracy"]
            if original is not None and result["images"] != "original"
            else None
        )


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


CSV_COLUMNS = (
    "benchmark",
    "images",
    "n",
    "k",
    "accuracy",
    "std",
    "ci95_low",
    "ci95_high",
    "pass_at_k",
    "format_rate",
    "response_length",
    "gap",
    "answer_kept",
    "rows",
    "dropped",
)


def to_csv(results: Sequence[dict[str, Any]]) -> str:
    """The results as CSV, one line per (benchmark, images); categories are in the JSON only."""
    out = io.StringIO()
    writer = csv.DictWriter(out, CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in results:
        row = {key: r.get(key) for key in CSV_COLUMNS}
        row["ci95_low"], row["ci95_high"] = r["ci95"]
        row["dropped"] = sum(r["dropped"].values())
        writer.writerow(row)
    return out.getvalue()


def _percent(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def to_markdown(results: Sequence[dict[str, Any]]) -> str:
    """A table a person reads: accuracy (%) ± std, the interval, pass@k, the gap to ``original``
    and the share of majority answers kept."""
    lines = [
        "| benchmark | images | n | k | accuracy ± std | 95% CI | pass@k | format | length "
        "| gap to original | answers kept |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        low, high = r["ci95"]
        gap = r.get("gap")
        lines.append(
            f"| {r['benchmark']} | {r['images']} | {r['n']} | {r['k']} | "
            f"{_percent(r['accuracy'])} ± {_percent(r['std'])} | "
            f"{_percent(low)}-{_percent(high)} | {_percent(r['pass_at_k'])} | "
            f"{_percent(r['format_rate'])} | {r['response_length']:.1f} | "
            f"{'-' if gap is None else f'{100 * gap:+.1f}'} | {_percent(r['answer_kept'])} |"
        )
    return "\n".join(lines) + "\n"


def write_results(directory: Path, payload: dict[str, Any]) -> None:
    """``results.json``, ``results.csv`` and ``results.md`` in ``directory``."""
    write_atomic(directory / "results.json", json.dumps(payload, indent=2) + "\n")
    write_atomic(directory / "results.csv", to_csv(payload["results"]))
    write_atomic(directory / "results.md", to_markdown(payload["results"]))


def log_tensorboard(directory: Path, results: Sequence[dict[str, Any]], step: int) -> None:
    """Scalars ``eval/<benchmark>/<images>/<figure>`` under ``directory/tensorboard``."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(directory / "tensorboard"))
    try:
        for r in results:
            prefix = f"eval/{r['benchmark']}/{r['images']}"
            for figure in ("accuracy", "std", "pass_at_k", "format_rate", "gap", "answer_kept"):
                value = r.get(figure)
                if value is not None and not math.isnan(value):
                    writer.add_scalar(f"{prefix}/{figure}", value, step)
            for category, value in r["by_category"].items():
                writer.add_scalar(f"{prefix}/category/{category}", value, step)
        writer.add_text("eval/results", to_markdown(results), step)
    finally:
        writer.close()
