"""A callback for resume tests: each rank appends, after every training step, the step's logged
figures and an exact digest of the policy's weights to ``steps_rank{r}.jsonl``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import lightning.pytorch as pl


def weights_digest(module: pl.LightningModule) -> str:
    """sha256 over the bytes of every policy weight, in name order: equal digests mean
    bit-identical weights."""
    digest = hashlib.sha256()
    for name, value in sorted(module.policy.named_parameters()):  # type: ignore[attr-defined]
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class RecordSteps(pl.Callback):
    """Appends ``{"step", "metrics", "weights"}`` per training step (floats written by repr, so
    equal lines mean bit-identical values; timings left out)."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        metrics = {
            key: repr(float(value))
            for key, value in sorted(trainer.callback_metrics.items())
            if key.startswith(("train/", "rollout/", "perception/")) and "seconds" not in key
        }
        record = {
            "step": trainer.global_step,
            "metrics": metrics,
            "weights": weights_digest(pl_module),
        }
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / f"steps_rank{trainer.global_rank}.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")


def read_steps(directory: Path, rank: int = 0) -> dict[int, dict]:
    """The records of ``directory`` by step (a resumed run's later record of a step wins)."""
    lines = (directory / f"steps_rank{rank}.jsonl").read_text().splitlines()
    return {record["step"]: record for record in map(json.loads, lines)}
