"""The logger RunSummary appends to print held-out lines (callbacks/summary.py HeldOutEcho) reports
the run's version, so the progress bar's v_num stays the run's (it read v_num=None)."""

from __future__ import annotations

from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.loggers.utilities import _version

from cppo_lightning.callbacks.summary import HeldOutEcho


def test_the_echo_reports_the_run_loggers_version(tmp_path):
    run = TensorBoardLogger(str(tmp_path), name="lightning_logs", version=3)
    echo = HeldOutEcho(beside=run)
    assert (echo.name, echo.version) == ("lightning_logs", 3)
    assert _version([run, echo]) == "3"  # what the progress bar shows as v_num
    assert HeldOutEcho().version is None


def test_the_echo_prints_held_out_metrics_only(caplog):
    import logging

    caplog.set_level(logging.INFO)
    echo = HeldOutEcho()
    echo.log_metrics({"train/loss": 0.5}, step=3)
    echo.log_metrics({"val/accuracy": 0.5}, step=4)
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("held-out at step 4: val/accuracy 0.5") for line in lines), lines
    assert not any("train/loss" in line for line in lines)
