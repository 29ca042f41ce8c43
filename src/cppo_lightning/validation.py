"""Held-out validation of :class:`~cppo_lightning.module.CPPOModule`: ``val/accuracy``,
``val/reward`` and ``val/response_length``, sampled from the held-out prompts.

``val/accuracy`` is avg@k: the mean of the reward term ``val_accuracy_term`` (``accuracy`` by
default) over ``val_samples`` responses per prompt at ``val_temperature`` (greedy when 0); a
reward without that term is refused when fit or validate starts, and ``val_accuracy_term: null``
logs no ``val/accuracy``. Responses are sampled by the module's rollout engine (the one training
rollouts use). Validation samples from its own random stream, so a run resumed from a checkpoint
written at a validation step takes the steps the uninterrupted run took.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import MeanMetric

from cppo_lightning.checkpoints import rng_states, set_rng_states
from cppo_lightning.records import PromptBatch
from cppo_lightning.rewards import WeightedReward
from cppo_lightning.rollout import RolloutEngine, Sampling, collect_rollouts


class HeldOutValidation(LightningModule):
    """The validation hooks of :class:`~cppo_lightning.module.CPPOModule`, which sets the
    attributes declared here from its constructor arguments (documented there) and calls
    :meth:`init_validation_metrics` from its constructor."""

    policy: torch.nn.Module | None
    processor: Any
    reward: WeightedReward
    suppress_token_ids: list[int]
    max_new_tokens: int
    val_temperature: float
    val_samples: int
    val_accuracy_term: str | None
    generation_batch_size: int | None

    def _generation_context(self) -> contextlib.AbstractContextManager[None]:
        raise NotImplementedError

    @property
    def rollout_engine(self) -> RolloutEngine:
        raise NotImplementedError

    def sync_rollout_engine(self) -> None:
        raise NotImplementedError

    def check_val_accuracy_term(self) -> None:
        """Refuse a ``val_accuracy_term`` that is not one of the reward's terms, and say which
        term ``val/accuracy`` reports (called when fit or validate starts, before any
        generation)."""
        term, terms = self.val_accuracy_term, sorted(self.reward.functions)
        if term is not None and term not in terms:
            raise ValueError(
                f"model.val_accuracy_term={term!r} is not a term of model.reward (its terms: "
                f"{', '.join(terms)}): set model.val_accuracy_term to one of them, or to null "
                "to log no val/accuracy."
            )
        rank_zero_info(
            f"validation: val/accuracy is the mean of reward term {term!r} "
            "(model.val_accuracy_term)"
            if term is not None
            else "validation: no val/accuracy is logged (model.val_accuracy_term is null)"
        )

    def init_validation_metrics(self) -> None:
        """Create the running means that validation fills (call once, in ``__init__``)."""
        self._training_rng: dict[str, Any] = {}  # generator states while validation runs
        self.val_accuracy = MeanMetric()
        self.val_reward = MeanMetric()
        self.val_response_length = MeanMetric()

    def on_validation_start(self) -> None:
        if self.trainer.state.fn == TrainerFn.VALIDATING:  # fit checks when it starts
            self.check_val_accuracy_term()
        self.sync_rollout_engine()
        # Held-out sampling draws from its own stream: a validation never moves the training
        # run's generators, so a run resumed from the checkpoint written at a validation step
        # takes the steps the uninterrupted run took.
        self._training_rng = rng_states()

    def on_validation_end(self) -> None:
        set_rng_states(self._training_rng)

    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        assert self.policy is not None
        with self._generation_context():
            rollout = collect_rollouts(
                self.policy,
                self.processor,
                batch,
                self.reward,
                Sampling(
                    self.max_new_tokens,
                    self.val_temperature,
                    batch_size=self.generation_batch_size,
                ),
                group_size=self.val_samples,
                suppress_token_ids=self.suppress_token_ids,
                engine=self.rollout_engine,
            )
        if self.val_accuracy_term is not None:  # a term of the reward: checked at the start
            self.val_accuracy.update(rollout.reward_terms[self.val_accuracy_term])
        self.val_reward.update(rollout.rewards)
        self.val_response_length.update(rollout.response_mask.sum(1).float())

    def on_validation_epoch_end(self) -> None:
        named = {
            "val/accuracy": self.val_accuracy,
            "val/reward": self.val_reward,
            "val/response_length": self.val_response_length,
        }
        if self.val_accuracy_term is None:
            del named["val/accuracy"]
        metrics = {name: metric.compute() for name, metric in named.items()}
        for metric in named.values():
            metric.reset()
        # Logged at the number of optimizer steps done (0 = before the first update). Lightning
        # drops what is logged during its sanity check, which here is the run over the whole
        # held-out set before training: the baseline a run is judged against.
        # Under `cppo validate` Lightning logs them itself and prints them as a table (it shows
        # only what goes to the logger).
        validating = self.trainer.state.fn == TrainerFn.VALIDATING
        for logger in [] if validating else self.loggers:
            logger.log_metrics({k: float(v) for k, v in metrics.items()}, step=self.global_step)
        if not self.trainer.sanity_checking:
            # Already global (torchmetrics syncs in compute); sync_dist only keeps ranks in step.
            self.log_dict(metrics, logger=validating, sync_dist=True)  # for callbacks and the bar
