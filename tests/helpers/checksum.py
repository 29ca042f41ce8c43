"""A callback for multi-process tests: each rank writes a checksum of the policy's weights."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl


class WriteParameterChecksum(pl.Callback):
    """At the end of fit, rank r writes ``rank{r}.txt`` with the sum of every policy weight
    (float64): equal files mean the ranks hold the same model."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        policy = pl_module.policy  # type: ignore[attr-defined]
        total = sum(float(p.detach().double().sum()) for p in policy.parameters())
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / f"rank{trainer.global_rank}.txt").write_text(repr(total))
