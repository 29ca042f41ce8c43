"""`cppo study` stopped by a signal sent to it alone (a scheduler's SIGTERM, `kill -INT <pid>`):
it passes the signal on to the `cppo fit` under way, which saves and exits, starts no further run,
reports, and exits 143 or 130 with no child left behind; the same command then continues the run
from the checkpoint it saved.

The study runs tests/helpers/runs.py's shrunk runs of 2 steps. Its fit is caught mid-run by
:class:`HoldAtStep` (given to every run as a pass-through callback): after step 1 it touches a
marker file and waits for the stop, so the signal always lands between two training steps with
the fit's own handlers installed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest

from tests.helpers.runs import BASE, REPO, fit_args


class HoldAtStep(pl.Callback):
    """Once, at the end of training step ``step``: touches ``marker``, then waits until the run
    is asked to stop (Lightning's SIGTERM handler sets ``trainer.received_sigterm``; a Ctrl-C
    becomes a SIGTERM under SaveOnStop), for at most ``seconds``."""

    def __init__(self, step: int, marker: str, seconds: float = 120.0) -> None:
        self.step = step
        self.marker = Path(marker)
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        if trainer.global_step != self.step or self.marker.exists():
            return
        self.marker.touch()
        deadline = time.monotonic() + self.seconds
        while not trainer.received_sigterm and time.monotonic() < deadline:
            time.sleep(0.05)


def _command(tmp_path: Path, seeds: tuple[str, ...]) -> list[str]:
    """``cppo study`` of grpo x ``seeds`` into ``tmp_path/study``, its fits held after step 1."""
    eval_set = tmp_path / "synthetic-4.yaml"  # configs/eval/synthetic.yaml: 4 rows, 16 tokens
    text = (REPO / "configs" / "eval" / "synthetic.yaml").read_text()
    eval_set.write_text(text.replace("max_new_tokens: 48", "max_new_tokens: 16") + "num_rows: 4\n")
    fit = fit_args(tmp_path / "unused")
    assert fit[:3] == ["fit", "--config", BASE]
    shrunk = [a for a in fit[3:] if not a.startswith("--trainer.default_root_dir=")]
    return [
        *(sys.executable, "-m", "cppo_lightning.cli", "study", "--config", BASE),
        *("--methods", "grpo", "--seeds", *seeds, "--output", str(tmp_path / "study")),
        *("--samples", "2", "--eval-batch-size", "4", "--eval-set", str(eval_set)),
        *shrunk,
        "--trainer.callbacks+=tests.e2e.test_study_signals.HoldAtStep",
        "--trainer.callbacks.step=1",
        f"--trainer.callbacks.marker={tmp_path / 'held'}",
    ]


def _processes() -> dict[int, tuple[int, str, str]]:
    """Every process: pid -> (parent pid, start time, state), from /proc/<pid>/stat."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (command)"
        except (OSError, IndexError):
            continue
        found[int(stat.parent.name)] = (int(fields[1]), fields[19], fields[0])
    return found


def _descendants(pid: int) -> dict[int, str]:
    """The processes under ``pid`` (children, theirs, ...): pid -> start time."""
    table = _processes()
    found: dict[int, str] = {}
    parents = {pid}
    while parents:
        children = {p for p, (ppid, _, _) in table.items() if ppid in parents and p not in found}
        found.update({p: table[p][1] for p in children})
        parents = children
    return found


def _alive(processes: dict[int, str]) -> list[int]:
    """Those of ``processes`` still running: there with the same start time, not a zombie."""
    table = _processes()
    return [
        pid
        for pid, start in processes.items()
        if pid in table and table[pid][1] == start and table[pid][2] != "Z"
    ]


def _stop_mid_fit(tmp_path: Path, signum: int, seeds: tuple[str, ...]) -> tuple[int, str]:
    """Start the study, wait for its first fit to hold after step 1, send ``signum`` to the
    study's process alone; its exit status and output, once no process it started is alive."""
    marker = tmp_path / "held"
    out = tmp_path / "study.out"
    with open(out, "w") as handle:
        # A session of its own: no terminal, so a SIGINT is not taken for a terminal's Ctrl-C
        # (which the runs would have received as well).
        study = subprocess.Popen(
            _command(tmp_path, seeds),
            cwd=REPO,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert study.poll() is None, out.read_text()
            assert time.monotonic() < deadline, out.read_text()
            time.sleep(0.2)
        started = _descendants(study.pid)
        assert started, "the held cppo fit is a child of the study"
        os.kill(study.pid, signum)
        status = study.wait(timeout=120)
    finally:
        if study.poll() is None:
            study.kill()
    assert _alive(started) == [], out.read_text()
    return status, out.read_text()


@pytest.mark.slow
def test_sigterm_to_the_study_alone_stops_its_fit_which_saves_and_a_rerun_resumes(tmp_path):
    status, said = _stop_mid_fit(tmp_path, signal.SIGTERM, seeds=("0",))
    assert status == 143, said
    assert "cppo study: stopped by SIGTERM; the runs under way saved their state." in said
    assert "grpo seed 0: cppo fit stopped by SIGTERM (exit status 143)" in said
    run = tmp_path / "study" / "runs" / "grpo-seed0"
    (checkpoint,) = run.glob("lightning_logs/version_0/checkpoints/preempted-step=1.ckpt")
    assert not (run / "run.json").exists()  # not finished
    study = json.loads((tmp_path / "study" / "study.json").read_text())
    assert [(r["method"], r["status"]) for r in study["runs"]] == [("grpo", "stopped")]

    done = subprocess.run(
        _command(tmp_path, ("0",)), cwd=REPO, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"grpo seed 0: training, resumed from {checkpoint}" in done.stdout
    fit_log = (run / "fit.log").read_text()
    assert f"--ckpt_path={checkpoint}" in fit_log
    assert f"Restoring states from the checkpoint path at {checkpoint}" in fit_log
    assert json.loads((run / "run.json").read_text())["status"] == "finished"


@pytest.mark.slow
def test_sigint_to_the_study_alone_is_passed_on_and_no_further_run_starts(tmp_path):
    status, said = _stop_mid_fit(tmp_path, signal.SIGINT, seeds=("0", "1"))
    assert status == 130, said
    assert "cppo study: stopped by SIGINT" in said
    runs = tmp_path / "study" / "runs"
    assert list(
        runs.glob("grpo-seed0/lightning_logs/version_0/checkpoints/interrupted-step=1.ckpt")
    )
    assert not (runs / "grpo-seed1").exists()  # never started
    study = json.loads((tmp_path / "study" / "study.json").read_text())
    assert [(r["seed"], r["status"]) for r in study["runs"]] == [(0, "stopped"), (1, "stopped")]
    assert study["runs"][1]["error"].startswith("not started: the study was stopped by SIGINT")
