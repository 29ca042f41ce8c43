"""Ctrl-C (SIGINT) mid-run takes the SIGTERM path: the run stops at a safe point, saves, exits 130
with the resume command, and that resume continues the run it was."""

from __future__ import annotations

import signal

import pytest
import torch

from cppo_lightning.callbacks.stops import INTERRUPTED_EXIT_CODE, SaveOnStop
from cppo_lightning.cli import main
from tests.helpers.runs import fit_args, run_recorded


@pytest.fixture(autouse=True)
def _sigint_as_in_a_terminal():
    """Python's own SIGINT handler, as an interactive run has it: under nohup, or as a background
    job of a non-interactive shell (how CI may start the suite), SIGINT arrives ignored, and the
    project then keeps ignoring it on purpose."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize(
    "signal_callback",
    ["tests.helpers.signals.SigintAt", "tests.helpers.signals.SigintInValidation"],
    ids=["during-a-step", "during-validation"],
)
def test_ctrl_c_saves_exits_130_and_the_saved_run_resumes(
    tmp_path, uninterrupted, caplog, signal_callback
):
    """Promise: a Ctrl-C in the middle of step 2 of 5 (after its rollout, before its backward
    pass), or during the held-out validation after step 2, ends the run after that step (or that
    validation) with SystemExit(130), a loadable checkpoint ``interrupted-step=2.ckpt`` and a log
    line with the resume command; the SIGINT handler is put back afterwards. Resuming from the
    checkpoint of the mid-step Ctrl-C takes the uninterrupted run's steps 3..5 bit for bit.
    Lightning's own handling ended the run with status 1 at the point the signal landed, saving
    nothing."""
    before = signal.getsignal(signal.SIGINT)
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
    assert exited.value.code == INTERRUPTED_EXIT_CODE == 130
    assert signal.getsignal(signal.SIGINT) is before
    (checkpoint,) = stopped.rglob("interrupted-step=2.ckpt")
    assert not list(stopped.rglob("preempted-*.ckpt"))
    assert torch.load(checkpoint, map_location="cpu", weights_only=False)["global_step"] == 2
    assert "Ctrl-C: stopped after step 2" in caplog.text
    assert "exit status 130. Resume with: cppo " in caplog.text
    assert f"--ckpt_path {checkpoint}" in caplog.text
    if signal_callback.endswith("InValidation"):
        return
    _, full = uninterrupted
    resumed = run_recorded(tmp_path / "resumed", f"--ckpt_path={checkpoint}")
    assert sorted(resumed) == [3, 4, 5]
    for later in resumed:
        assert resumed[later]["metrics"] == full[later]["metrics"], f"step {later}"
        assert resumed[later]["weights"] == full[later]["weights"], f"step {later}"


def test_the_first_ctrl_c_asks_for_the_sigterm_stop_and_a_second_one_aborts_at_once():
    """Promise: during training the first Ctrl-C raises nothing where it lands: it asks for the
    stop Lightning makes on SIGTERM (at its next safe point) and puts the previous SIGINT handler
    back, so a second Ctrl-C raises ``KeyboardInterrupt`` at once (Lightning then exits 1)."""
    sigterms: list[int] = []
    previous_term = signal.signal(signal.SIGTERM, lambda signum, frame: sigterms.append(signum))
    previous_int = signal.getsignal(signal.SIGINT)
    try:
        stop = SaveOnStop()
        stop.on_train_start(None, None)  # type: ignore[arg-type]
        assert signal.getsignal(signal.SIGINT) is not previous_int
        signal.raise_signal(signal.SIGINT)
        assert sigterms == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGINT) is previous_int
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
        assert sigterms == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGINT, previous_int)
