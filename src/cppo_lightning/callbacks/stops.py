"""A run that stops before its end saves first: on SIGTERM (a scheduler's preemption; then exit
status 143), on Ctrl-C (SIGINT; then exit status 130) and on a reward term that keeps failing
(``cppo_lightning.rewards.RewardFailure``)."""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
from types import FrameType
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from cppo_lightning.rewards import RewardFailure

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, what a shell reports for a process SIGTERM ended
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, what a shell reports for a process Ctrl-C ended


def resume_command(path: str, argv: list[str] | None = None) -> str:
    """The ``cppo`` command line that resumes this run from ``path``: the original arguments
    with any earlier ``--ckpt_path`` replaced."""
    args = list(sys.argv[1:] if argv is None else argv)
    kept: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg == "--ckpt_path":
            skip = True
            continue
        if not arg.startswith("--ckpt_path="):
            kept.append(arg)
    return shlex.join(["cppo", *kept, "--ckpt_path", path])


class SaveOnStop(pl.Callback):
    """Always on under ``cppo fit``. On SIGTERM, Lightning stops after the current step and
    exits with status 0, saving nothing: this callback saves
    ``<checkpoint folder>/preempted-step=<k>.ckpt``, logs the command that resumes the run, and
    makes the process exit with :data:`PREEMPTED_EXIT_CODE` (143), so a scheduler can tell a
    preempted run from a finished one.

    Ctrl-C (SIGINT) from the first training step on takes the same path: Lightning's default is
    a ``KeyboardInterrupt`` wherever it lands (possibly between two checkpoint writes) and exit
    status 1 with nothing saved. Here the first Ctrl-C asks for the SIGTERM stop, so the run
    stops after the current step (or held-out validation batch), saves
    ``interrupted-step=<k>.ckpt``, logs the resume command and exits with
    :data:`INTERRUPTED_EXIT_CODE` (130). A second Ctrl-C aborts at once, as Lightning does
    (exit status 1; checkpoint files are still whole or absent).

    On :class:`~cppo_lightning.rewards.RewardFailure` it saves ``reward-failure-step=<k>.ckpt``
    (the weights after the last completed step) and logs the resume command; the error then ends
    the run with its message and a non-zero status."""

    def __init__(self) -> None:
        self._interrupted = False
        self._installed = False
        self._previous_sigint: Any = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._interrupted = False
        # Signal handlers can only be set from the main thread (not so in a spawned worker); a
        # process started with SIGINT ignored (`nohup`, a background job) keeps ignoring it.
        if (
            threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN
        ):
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)
            self._installed = True

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_sigint()

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        self._interrupted = True
        self._restore_sigint()  # a second Ctrl-C aborts at once
        rank_zero_info(
            "Ctrl-C: stopping after the current step to save a checkpoint (press Ctrl-C again "
            "to abort without saving)."
        )
        # Lightning's SIGTERM handler (installed for the whole run) raises the stop at its safe
        # points: after the training step, after a validation batch, on every rank under DDP.
        signal.raise_signal(signal.SIGTERM)

    def _restore_sigint(self) -> None:
        if self._installed:
            # None: the previous handler was not set from Python; the default stands in for it.
            previous = self._previous_sigint
            signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)
            self._installed = False

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._restore_sigint()
        if trainer.state.fn != TrainerFn.FITTING:
            return
        if isinstance(exception, SIGTERMException):
            name, kind, code = (
                ("Ctrl-C", "interrupted", INTERRUPTED_EXIT_CODE)
                if self._interrupted
                else ("SIGTERM", "preempted", PREEMPTED_EXIT_CODE)
            )
            exception.code = code
            if trainer.checkpoint_callback is None:
                rank_zero_info(
                    f"{name}: stopped after step {trainer.global_step}; nothing saved: "
                    "checkpointing is off (trainer.enable_checkpointing=false)."
                )
                return
            path = self._save(trainer, kind)
            rank_zero_info(
                f"{name}: stopped after step {trainer.global_step} and saved {path}; exit "
                f"status {code}. Resume with: {resume_command(path)}"
            )
        elif isinstance(exception, RewardFailure):
            if trainer.checkpoint_callback is None:
                rank_zero_info(
                    f"stopped after step {trainer.global_step}; nothing saved: checkpointing is "
                    "off (trainer.enable_checkpointing=false)."
                )
                return
            path = self._save(trainer, "reward-failure")
            rank_zero_info(
                f"stopped: {exception} Saved {path} (step {trainer.global_step}). Resume with: "
                f"{resume_command(path)}"
            )

    @staticmethod
    def _save(trainer: pl.Trainer, kind: str) -> str:
        callback = trainer.checkpoint_callback
        folder = getattr(callback, "dirpath", None) or os.path.join(
            trainer.log_dir or trainer.default_root_dir, "checkpoints"
        )
        path = os.path.join(folder, f"{kind}-step={trainer.global_step}.ckpt")
        trainer.save_checkpoint(path)
        return path
