"""A rollout engine and a rollout callback of a user's own, to test those plug-in points."""

from __future__ import annotations

from typing import Any

import torch

from cppo_lightning.callbacks import RolloutCallback
from cppo_lightning.rollout import HFGenerate, Samples


class RecordingEngine(HFGenerate):
    """HF generate that counts its calls and the policy updates it is told about."""

    def __init__(self, tag: str = "") -> None:
        self.tag = tag
        self.samples = 0
        self.updates = 0

    def sample(self, *args: Any, **kwargs: Any) -> Samples:
        self.samples += 1
        return super().sample(*args, **kwargs)

    def on_policy_update(self, policy: torch.nn.Module) -> None:
        self.updates += 1


class CountingRollout(RolloutCallback):
    """A user's rollout callback: the stock rollout, counted."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.calls = 0

    def collect(self, pl_module: Any, batch: Any) -> Any:
        self.calls += 1
        return super().collect(pl_module, batch)
