"""A run that stops before its end saves first: on SIGTERM (a scheduler's preemption; then exit
status 143) and on a reward term that keeps failing (``cppo_lightning.rewards.RewardFailure``)."""

from __future__ import annotations

import os
import shlex
import sys

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from cppo_lightning.rewards import RewardFailure

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, what a shell reports for a process SIGTERM ended


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
    preempted run from a finished one. On :class:`~cppo_lightning.rewards.RewardFailure` it saves
    ``reward-failure-step=<k>.ckpt`` (the weights after the last completed step) and logs the
    resume command; the error then ends the run with its message and a non-zero status."""

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            return
        if isinstance(exception, (SIGTERMException, RewardFailure)) and (
            trainer.checkpoint_callback is None
        ):
            rank_zero_info(
                f"stopped after step {trainer.global_step}; nothing saved: checkpointing is off "
                "(trainer.enable_checkpointing=false)."
            )
            if isinstance(exception, SIGTERMException):
                exception.code = PREEMPTED_EXIT_CODE
            return
        if isinstance(exception, SIGTERMException):
            path = self._save(trainer, "preempted")
            rank_zero_info(
                f"SIGTERM: stopped after step {trainer.global_step} and saved {path}; exit "
                f"status {PREEMPTED_EXIT_CODE}. Resume with: {resume_command(path)}"
            )
            exception.code = PREEMPTED_EXIT_CODE
        elif isinstance(exception, RewardFailure):
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
