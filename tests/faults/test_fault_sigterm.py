"""SIGTERM mid-run: the run saves, exits 143 (not 0) with the resume command, and that resume
continues the run it was."""

from __future__ import annotations

import pytest

from cppo_lightning.callbacks.stops import PREEMPTED_EXIT_CODE, resume_command
from cppo_lightning.cli import main
from tests.helpers.runs import fit_args, run_recorded


@pytest.mark.parametrize(
    "signal_callback",
    ["tests.helpers.signals.SigtermAt", "tests.helpers.signals.SigtermInValidation"],
    ids=["during-a-step", "during-validation"],
)
def test_sigterm_saves_exits_143_and_the_saved_run_resumes_bit_for_bit(
    tmp_path, uninterrupted, caplog, signal_callback
):
    """Promise: a SIGTERM during step 2 of 5, or during the held-out validation after it, ends
    the run (after that step, or after that validation) with SystemExit(143), a checkpoint
    ``preempted-step=2.ckpt`` and a log line with the resume command; resuming from it takes the
    uninterrupted run's steps 3..5 bit for bit."""
    stopped = tmp_path / "stopped"
    record = ["--trainer.callbacks+=tests.helpers.steps.RecordSteps"]
    with pytest.raises(SystemExit) as exited, caplog.at_level("INFO"):
        main(
            fit_args(
                stopped,
                *record,
                f"--trainer.callbacks.directory={stopped}",
                f"--trainer.callbacks+={signal_callback}",
                "--trainer.callbacks.step=2",
                steps=5,
            )
        )
    assert exited.value.code == PREEMPTED_EXIT_CODE == 143
    (checkpoint,) = stopped.rglob("preempted-step=2.ckpt")
    assert f"--ckpt_path {checkpoint}" in caplog.text
    _, full = uninterrupted
    resumed = run_recorded(tmp_path / "resumed", f"--ckpt_path={checkpoint}")
    assert sorted(resumed) == [3, 4, 5]
    for later in resumed:
        assert resumed[later]["metrics"] == full[later]["metrics"], f"step {later}"
        assert resumed[later]["weights"] == full[later]["weights"], f"step {later}"


def test_the_resume_command_replaces_an_earlier_ckpt_path():
    assert (
        resume_command("/r/b.ckpt", ["fit", "--config", "c.yaml", "--ckpt_path", "/r/a.ckpt"])
        == "cppo fit --config c.yaml --ckpt_path /r/b.ckpt"
    )
    assert (
        resume_command("/r/b.ckpt", ["fit", "--ckpt_path=/a"]) == "cppo fit --ckpt_path /r/b.ckpt"
    )
