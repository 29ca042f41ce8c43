"""When perception tokens are detected, and how much the contrastive loss weighs (lambda)."""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as pl

from cppo_lightning.detection import TokenSelector
from cppo_lightning.module import CPPOModule


def _cppo_module(module: pl.LightningModule, name: str) -> CPPOModule:
    if not isinstance(module, CPPOModule):
        raise TypeError(f"{name} needs a CPPOModule, got {type(module).__name__}.")
    return module


class PerceptionTokens(pl.Callback):
    """Selects the perception tokens the contrastive loss acts on (docs/method.md §2).

    With ``policy="update"`` (the default, as the recipe) detection happens inside every
    micro-batch of the update, with the policy being trained, from the original-image and
    information-removing forwards the loss runs anyway: it costs no extra forward. With
    ``policy="rollout"`` the tokens are detected once per rollout batch, right after sampling,
    with the policy that sampled them (two extra no-grad forwards over all responses).

    Args:
        top_fraction: rho: per response, keep the top ``floor(rho * n)`` (at least 1) of its n
            tokens whose entropy rises under the information-removing image; ties kept.
        score: ``normalized`` ranks by ``relu(dH) / (H- + 1e-6)`` (the paper's); ``raw`` by ``dH``.
        top_k: Keep an absolute number of tokens per response instead of a fraction.
        gate_advantages: Only responses with a positive advantage carry perception tokens.
        policy: ``update`` (update-time policy) or ``rollout`` (rollout-time policy).
        ranking: Which tokens fill each response's budget (the number the entropy-shift rule
            keeps): ``entropy-shift`` (the paper), ``entropy`` (highest entropy under the
            original image) or ``random`` (uniformly, from torch's global generator, which
            checkpoints restore): CPPO's own ablations (configs/experiments/cppo-*.yaml).
    """

    def __init__(
        self,
        top_fraction: float = 0.5,
        score: Literal["normalized", "raw"] = "normalized",
        top_k: int | None = None,
        gate_advantages: bool = True,
        policy: Literal["update", "rollout"] = "update",
        ranking: Literal["entropy-shift", "entropy", "random"] = "entropy-shift",
    ) -> None:
        if policy not in ("update", "rollout"):
            raise ValueError(f"perception_tokens.policy must be update or rollout, got {policy!r}.")
        self.selector = TokenSelector(
            top_fraction=top_fraction,
            score=score,
            top_k=top_k,
            gate_advantages=gate_advantages,
            ranking=ranking,
        )
        self.policy = policy

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _cppo_module(pl_module, "PerceptionTokens").set_token_selector(self.selector)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.policy != "rollout":
            return
        module = _cppo_module(pl_module, "PerceptionTokens")
        rollout = module.pending_rollout
        if rollout is None:
            raise RuntimeError(
                "perception_tokens.policy=rollout runs after the rollout callback, but no "
                "rollout was collected for this batch."
            )
        module.set_rollout(module.update.detect_perception_tokens(rollout))


class CPLWeight(pl.Callback):
    """Owns lambda, the weight of the contrastive perception loss, over training.

    The weight at rollout batch t: a linear warm-up from 0 over ``warmup_steps``, then
    ``value`` (constant), or a linear / cosine decay from ``value`` to ``final_value`` at
    ``total_steps``. The count of rollout batches is saved in checkpoints, so a resumed run
    continues the schedule where it stopped.

    Args:
        value: lambda after warm-up (the recipe's 0.01).
        schedule: ``constant``, ``linear`` or ``cosine``.
        warmup_steps: Rollout batches of linear warm-up from 0.
        final_value: Weight reached at ``total_steps`` by the linear and cosine schedules.
        total_steps: Length of the decay; ``trainer.max_steps`` when None.
    """

    def __init__(
        self,
        value: float = 0.01,
        schedule: Literal["constant", "linear", "cosine"] = "constant",
        warmup_steps: int = 0,
        final_value: float = 0.0,
        total_steps: int | None = None,
    ) -> None:
        if value < 0 or final_value < 0:
            raise ValueError(
                f"cpl_weight.value and final_value must be >= 0, got {value} and {final_value}."
            )
        if schedule not in ("constant", "linear", "cosine"):
            raise ValueError(
                f"cpl_weight.schedule must be constant, linear or cosine, got {schedule!r}."
            )
        if warmup_steps < 0 or (total_steps is not None and total_steps < 1):
            raise ValueError(
                f"cpl_weight.warmup_steps must be >= 0 and total_steps >= 1 (or null), got "
                f"{warmup_steps} and {total_steps}."
            )
        self.value, self.schedule, self.final_value = value, schedule, final_value
        self.warmup_steps, self.total_steps = warmup_steps, total_steps
        self.step = 0  # rollout batches seen; checkpointed

    def weight(self, step: int, total_steps: int | None = None) -> float:
        """lambda at rollout batch ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.value * step / self.warmup_steps
        if self.schedule == "constant":
            return self.value
        total = self.total_steps or total_steps
        if not total or total <= self.warmup_steps:
            raise ValueError(
                f"cpl_weight.schedule={self.schedule} needs total_steps (or trainer.max_steps) "
                f"greater than warmup_steps={self.warmup_steps}."
            )
        progress = min(1.0, (step - self.warmup_steps) / (total - self.warmup_steps))
        if self.schedule == "linear":
            shape = 1.0 - progress
        else:
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.final_value + (self.value - self.final_value) * shape

    def _apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        _cppo_module(pl_module, "CPLWeight").set_cpl_weight(self.weight(self.step, total))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply(trainer, pl_module)  # set before the module checks its set-up

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._apply(trainer, pl_module)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self.step += 1

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step = int(state_dict["step"])
