"""Callbacks that deliver SIGTERM or SIGINT (Ctrl-C) to their own process at a given step, for the
fault tests."""

from __future__ import annotations

import os
import signal

import lightning.pytorch as pl


class SigtermAt(pl.Callback):
    """Sends SIGTERM to this process at the end of training step ``step`` (1-based), as a
    scheduler would; Lightning's handler sets ``trainer.received_sigterm``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


class SigtermInValidation(pl.Callback):
    """Sends SIGTERM to this process during the held-out validation after training step
    ``step`` (not the sanity check), at the end of its first batch."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:  # type: ignore[no-untyped-def]
        if not trainer.sanity_checking and trainer.global_step == self.step and batch_idx == 0:
            os.kill(os.getpid(), signal.SIGTERM)


class SigintAt(pl.Callback):
    """Sends SIGINT (a Ctrl-C) to this process in the middle of training step ``step``
    (1-based): before its first backward pass, after its rollout."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.sent = False

    def on_before_backward(self, trainer, pl_module, loss) -> None:  # type: ignore[no-untyped-def]
        if trainer.global_step == self.step - 1 and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGINT)


class SigintInValidation(pl.Callback):
    """Sends SIGINT to this process during the held-out validation after training step ``step``
    (not the sanity check), at the end of its first batch."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:  # type: ignore[no-untyped-def]
        if not trainer.sanity_checking and trainer.global_step == self.step and batch_idx == 0:
            os.kill(os.getpid(), signal.SIGINT)
