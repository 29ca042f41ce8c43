"""Rollout engines and a rollout callback of a user's own, to test those plug-in points, and an
engine that preempts its own ``cppo evaluate`` (SIGTERM), for the fault tests."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import torch

from cppo_lightning.callbacks import RolloutCallback
from cppo_lightning.rollout import HFGenerate, Samples


class RecordingEngine(HFGenerate):
    """HF generate that counts its calls and the policy updates it is told about.

    Args:
        tag: A name, to tell engines apart.
        log: A file that gets one JSON line per ``sample`` call (``num_samples``, ``prompts``),
            for runs whose engine object the test cannot reach (``cppo evaluate``).
    """

    def __init__(self, tag: str = "", log: str | None = None) -> None:
        self.tag = tag
        self.log = log
        self.samples = 0
        self.updates = 0
        #: ``num_samples`` of every ``sample`` call, in order.
        self.num_samples: list[int] = []

    def sample(self, *args: Any, **kwargs: Any) -> Samples:
        self.samples += 1
        self.num_samples.append(kwargs["num_samples"])
        if self.log is not None:
            line = {"num_samples": kwargs["num_samples"], "prompts": args[2].num_prompts}
            with Path(self.log).open("a") as file:
                file.write(json.dumps(line) + "\n")
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


class SigtermOnce(HFGenerate):
    """HF generate that sends SIGTERM to its own process as its ``call``-th ``sample`` call
    starts, as a scheduler preempts a job, unless ``marker`` exists (it is created then): the
    same command run again is not preempted. Samples exactly as :class:`HFGenerate`.
    """

    def __init__(self, marker: str, call: int = 2) -> None:
        self.marker = Path(marker)
        self.call = call
        self.calls = 0

    def sample(self, *args: Any, **kwargs: Any) -> Samples:
        self.calls += 1
        if self.calls == self.call and not self.marker.exists():
            self.marker.touch()
            os.kill(os.getpid(), signal.SIGTERM)
        return super().sample(*args, **kwargs)
