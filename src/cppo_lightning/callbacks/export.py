"""Export the trained policy in Hugging Face format at the end of fit."""

from __future__ import annotations

import os

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn

from cppo_lightning.module import CPPOModule


class ExportPolicy(pl.Callback):
    """Writes the policy (LoRA merged) and its processor with ``save_pretrained`` when fit ends.

    Args:
        dirname: Folder, relative to the trainer's log directory unless absolute.
    """

    def __init__(self, dirname: str = "hf_policy") -> None:
        self.dirname = dirname

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
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
        target = self.dirname
        if not os.path.isabs(target):
            target = os.path.join(trainer.log_dir or trainer.default_root_dir, target)
        if trainer.is_global_zero:
            pl_module.save_pretrained(target)
        trainer.strategy.barrier("export")
