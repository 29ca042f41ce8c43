"""``python benchmarks/gpu_check.py --tiny``: every part of the GPU check, on the CPU with the
embedded model, through the real ``cppo fit`` CLI, so the script does not rot before a GPU runs
it. Figures are checked for presence and sanity, never for speed."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from benchmarks.gpu_check import FIT_PARTS, ORDER, TINY
from benchmarks.gpu_check_report import FIGURES, compare

REPO = Path(__file__).resolve().parents[2]
SCRIPT = str(REPO / "benchmarks" / "gpu_check.py")
TIMED = ("generate_tokens_per_s", "generate_s", "views_s", "logp_s", "update_s", "step_s")


def _run(output: Path, *flags: str) -> tuple[dict, str]:
    done = subprocess.run(
        [sys.executable, SCRIPT, "--tiny", "--jobs", "2", "--output", str(output), *flags],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(output.read_text()), done.stdout


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):  # type: ignore[no-untyped-def]
    return _run(tmp_path_factory.mktemp("gpu_check") / "tiny.json")


def test_every_part_runs_on_the_cpu_and_reports_its_phases(tiny):  # type: ignore[no-untyped-def]
    report = tiny[0]
    assert list(report["parts"]) == list(ORDER)
    statuses = {part: row["status"] for part, row in report["parts"].items()}
    assert statuses == {
        "build": "skipped",  # --tiny uses the embedded model
        "lora-1024": "ok",
        "correctness": "ok",
        "lora-4096": "ok",
        "full": "ok",
        "fsdp": "skipped",  # FSDP needs CUDA
    }, {p: r["message"] for p, r in report["parts"].items()}
    for part in ("lora-1024", "lora-4096", "full"):
        row = report["parts"][part]
        figures = row["figures"]
        assert set(figures) == set(FIGURES)
        for key in (*TIMED, "rollout_s", "peak_gib", "trainable_parameters"):
            value = figures[key]
            assert value is not None and math.isfinite(value) and value > 0, (part, key, value)
        # Forced to the length: every response has exactly rollout.max_new_tokens tokens.
        assert figures["response_length"] == TINY.new_tokens[part] == row["settings"]["new_tokens"]
        assert figures["rollout_batches_timed"] == max(1, TINY.rollout_batches[part] - 1)
        assert figures["update_s"] < figures["step_s"]
        assert Path(row["log"]).exists()
    lora, full = (report["parts"][p]["figures"] for p in ("lora-1024", "full"))
    assert lora["trainable_parameters"] < full["trainable_parameters"]  # adapters only
    env = report["environment"]
    assert env["device"] == "cpu" and env["torch"] and env["transformers"] and env["git_commit"]
    assert report["schema"] == 1 and report["tiny"] is True


def test_the_correctness_checks_pass_within_their_stated_tolerances(tiny):  # type: ignore[no-untyped-def]
    report, stdout = tiny
    names = [check["name"] for check in report["checks"]]
    for wanted in ("preserving views", "removing views", "log-probs", "entropies"):
        assert any(wanted in name for name in names), (wanted, names)
    assert sum("fp32" in name for name in names) == 2 and sum("bf16" in name for name in names) == 2
    assert [n for n in names if "logp_mismatch" in n] == [
        f"rollout/logp_mismatch of {p} (32-true)" for p in FIT_PARTS if p != "fsdp"
    ]
    for check in report["checks"]:
        assert check["passed"] and 0 <= check["value"] <= check["tolerance"], check
    # The printed table has a row per part and per check.
    for part in ORDER:
        assert f"| {part} | " in stdout
    assert stdout.count("| pass |") == len(report["checks"])


def test_a_part_over_its_budget_is_a_row_and_the_next_part_still_runs(tiny, tmp_path):  # type: ignore[no-untyped-def]
    # --compare against the file the run is about to overwrite: it is read first.
    output = tmp_path / "cut.json"
    output.write_text(json.dumps(tiny[0]))
    flags = ("--parts", "lora-1024", "correctness", "--budget", "lora-1024=1")
    report, stdout = _run(output, *flags, "--compare", str(output))
    parts = report["parts"]
    assert parts["lora-1024"]["status"] == "timeout"
    assert "budget of 1 s" in parts["lora-1024"]["message"]
    assert parts["lora-1024"]["seconds"] < 30  # killed, not waited for
    assert parts["correctness"]["status"] == "ok"
    assert {parts[p]["status"] for p in ("build", "lora-4096", "full", "fsdp")} == {"not-selected"}
    assert "timeout: stopped after its budget of 1 s" in stdout
    # The comparison: the statuses that changed, and no figure the cut run did not measure.
    lines = stdout.splitlines()
    assert "| lora-1024 | status | ok | timeout | |" in lines
    assert "| full | status | ok | not-selected | |" in lines
    assert not any(line.startswith("| lora-1024 | generate_s") for line in lines)
    assert compare(tiny[0], report).splitlines()[-3:] == lines[-3:]
