"""What the console shows, and when checkpoints are written, for a run whose training batch is a
rollout batch making several optimizer steps.

Lightning's progress bar counts training batches within an epoch (``Epoch 1/-2``, ``50/100`` on
the default run), and its ``ModelCheckpoint`` warns on every run that manual optimisation saves
the state after the optimizer step. Here a rollout batch is a whole unit of work: the state after
all its optimizer steps is the one to resume from, and optimizer steps (``trainer.global_step``,
the x-axis of every logged metric) are what ``trainer.max_steps`` counts.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar


def _steps_per_batch(pl_module: pl.LightningModule) -> int:
    return int(getattr(pl_module, "optimizer_steps_per_batch", 1))


class RunProgressBar(TQDMProgressBar):
    """The training bar counts optimizer steps up to ``trainer.max_steps`` across epochs, and
    names the rollout batch: ``Rollout batch 6/300, optimizer step: 12/600``. The ``cppo`` CLI
    adds it unless the config lists another progress bar or turns the bar off."""

    @property
    def sanity_check_description(self) -> str:
        # The sanity check runs the whole held-out set: it is the run's step-0 validation.
        return "Validation before the first update"

    def _describe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        per_batch = _steps_per_batch(pl_module)
        batch = trainer.global_step // per_batch
        total = f"/{trainer.max_steps // per_batch}" if trainer.max_steps > 0 else ""
        self.train_progress_bar.set_description(f"Rollout batch {batch}{total}, optimizer step")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps if trainer.max_steps > 0 else None)
        bar.initial = trainer.global_step  # a resumed run starts where it stopped
        bar.n = trainer.global_step
        self._describe(trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        # One bar over the whole run: a new pass over the prompts does not restart it.
        pass

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        bar = self.train_progress_bar
        if bar is None or not self.is_enabled:
            return
        bar.n = trainer.global_step
        self._describe(trainer, pl_module)
        bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
        bar.refresh()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))


class StepCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``every_n_train_steps`` counts optimizer steps of a module that
    makes several per rollout batch (manual optimisation).

    A checkpoint is written at the end of each rollout batch whose optimizer steps reach a
    multiple of ``every_n_train_steps``, with the weights after those steps: the state a resumed
    run continues from. Lightning's own class writes at the same steps when the interval is a
    multiple of the steps per batch (and never otherwise), and warns on every run that the state
    is the post-step one; this class writes at any interval and has nothing to warn about. All
    other arguments are ``ModelCheckpoint``'s.
    """

    _batch_start_step = 0

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_start_step = trainer.global_step

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        every = self._every_n_train_steps
        if pl_module.automatic_optimization or every < 1:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        # Did this batch's optimizer steps (start, global_step] cross a multiple of the interval?
        if trainer.global_step // every == self._batch_start_step // every:
            return
        if self._should_skip_saving_checkpoint(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        if self.monitor is not None and self.monitor not in candidates:
            self._defer_save_until_validation = True  # as ModelCheckpoint: save after validation
            return
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)
