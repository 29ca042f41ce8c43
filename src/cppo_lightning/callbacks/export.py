"""Export the trained policy in Hugging Face format at the end of fit."""

from __future__ import annotations

import os

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn

from cppo_lightning.module import CPPOModule


class ExportFailed(RuntimeError):
    """The end-of-fit export could not be written (e.g. the disk filled); nothing was left under
    its name, and the checkpoints are as the run saved them."""


class ExportPolicy(pl.Callback):
    """Writes the policy (LoRA merged) and its processor with ``save_pretrained`` when fit ends.

    The export is written to a temporary folder next to its target and renamed into place
    (:func:`cppo_lightning.export.write_folder`): a write that fails half way (a full disk) leaves
    no half-written ``hf_policy/``, and the run ends with :class:`ExportFailed`, which says how to
    export the last checkpoint instead. It is raised when fit ends (``on_fit_end``), after the
    checkpoint callbacks (which Lightning calls after this one) have saved ``last.ckpt``.

    Args:
        dirname: Folder, relative to the trainer's log directory unless absolute.
    """

    def __init__(self, dirname: str = "hf_policy") -> None:
        self.dirname = dirname
        #: The folder written when fit ended (on global rank 0; None before, or if not written).
        self.path: str | None = None
        self._failure: tuple[str, BaseException | None] | None = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from cppo_lightning.export import write_folder

        if not isinstance(pl_module, CPPOModule):
            return
        if pl_module.sharded:
            # Gathering and merging sharded weights here is untested: export from the checkpoint.
            rank_zero_warn(
                "ExportPolicy skipped under FSDP: export the checkpoint instead with "
                "`cppo export <log_dir>/checkpoints/last.ckpt <output>`."
            )
            return
        # Every rank reads log_dir (a broadcast); rank 0 writes.
        log_dir = trainer.log_dir or trainer.default_root_dir
        target = self.dirname
        if not os.path.isabs(target):
            target = os.path.join(log_dir, target)
        failure, cause = None, None
        if trainer.is_global_zero:
            try:
                write_folder(target, lambda staging: pl_module.save_pretrained(str(staging)))
                self.path = target
            except Exception as error:  # every rank must hear of it, so it is raised below
                last = getattr(trainer.checkpoint_callback, "last_model_path", "") or os.path.join(
                    log_dir, "checkpoints", "last.ckpt"
                )
                failure, cause = (
                    (
                        f"ExportPolicy: writing {target} failed ({type(error).__name__}: {error}); "
                        "nothing was left under that name. The run's checkpoints are whole: free "
                        f"space, then export one with `cppo export {last} {target}`."
                    ),
                    error,
                )
        # A broadcast instead of a barrier: every rank learns of a failure, to stop with it.
        failure = trainer.strategy.broadcast(failure)
        self._failure = None if failure is None else (failure, cause)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._failure is not None:
            (message, cause), self._failure = self._failure, None
            raise ExportFailed(message) from cause
