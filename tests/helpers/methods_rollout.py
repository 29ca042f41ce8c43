"""Helpers of the rollout-seam tests (DAPO's dynamic sampling), importable by dotted path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl


def counting_only_reward(completions: list[str], *, kind: list[str], **_: Any) -> list[float]:
    """Longer responses score higher on the synthetic task's counting questions
    (``kind == "color_count"``), every response scores 0 on the others: a group of another kind
    always has equal rewards, which a rollout filter drops."""
    return [
        len(text) / 100.0 if k == "color_count" else 0.0
        for text, k in zip(completions, kind, strict=True)
    ]


class RecordGroups(pl.Callback):
    """Each rank appends the number of groups each training step learned from to
    ``groups_rank{r}.txt`` (one line per step)."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        record = pl_module.last_update
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / f"groups_rank{trainer.global_rank}.txt", "a") as handle:
            handle.write(f"{record.rollout.prompts.num_prompts}\n")
