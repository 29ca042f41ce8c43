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

from typing import TYPE_CHECKING, Any

from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info

from cppo_lightning.checkpoints import rng_states, set_rng_states
from cppo_lightning.records import PromptBatch
from cppo_lightning.rollout import Sampling, collect_rollouts

if TYPE_CHECKING:
    from cppo_lightning.module import CPPOModule


class HeldOutValidation:
    """Held-out validation of :class:`~cppo_lightning.module.CPPOModule` (``module.validation``):
    the module's validation hooks call these. The module owns the running means
    (``val_accuracy``, ``val_reward``, ``val_response_length``) and the settings.
    """

    def __init__(self, module: CPPOModule) -> None:
        self.module = module
        self._training_rng: dict[str, Any] = {}  # generator states while validation runs

    def check_val_accuracy_term(self) -> None:
        """Refuse a ``val_accuracy_term`` that is not one of the reward's terms, and say which
        term ``val/accuracy`` reports (called when fit or validate starts, before any
        generation)."""
        term, terms = self.module.val_accuracy_term, sorted(self.module.reward.functions)
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

    def on_validation_start(self) -> None:
        if self.module.trainer.state.fn == TrainerFn.VALIDATING:  # fit checks when it starts
            self.check_val_accuracy_term()
        self.module.sync_rollout_engine()
        # Held-out sampling draws from its own stream: a validation never moves the training
        # run's generators, so a run resumed from the checkpoint written at a validation step
        # takes the steps the uninterrupted run took.
        self._training_rng = rng_states()

    def on_validation_end(self) -> None:
        set_rng_states(self._training_rng)

    def validation_step(self, batch: PromptBatch) -> None:
        assert self.module.policy is not None
        with self.module._generation_context():
            rollout = collect_rollouts(
                self.module.policy,
                self.module.processor,
                batch,
                self.module.reward,
                Sampling(
                    self.module.max_new_tokens,
                    self.module.val_temperature,
                    batch_size=self.module.generation_batch_size,
                ),
                group_size=self.module.val_samples,
                suppress_token_ids=self.module.suppress_token_ids,
                engine=self.module.rollout_engine,
            )
        if self.module.val_accuracy_term is not None:  # a term of the reward: checked at the start
            self.module.val_accuracy.update(rollout.reward_terms[self.module.val_accuracy_term])
        self.module.val_reward.update(rollout.rewards)
        self.module.val_response_length.update(rollout.response_mask.sum(1).float())

    def on_validation_epoch_end(self) -> None:
        named = {
            "val/accuracy": self.module.val_accuracy,
            "val/reward": self.module.val_reward,
            "val/response_length": self.module.val_response_length,
        }
        if self.module.val_accuracy_term is None:
            del named["val/accuracy"]
        metrics = {name: metric.compute() for name, metric in named.items()}
        for metric in named.values():
            metric.reset()
        # Logged at the number of optimizer steps done (0 = before the first update). Lightning
        # drops what is logged during its sanity check, which here is the run over the whole
        # held-out set before training: the baseline a run is judged against.
        # Under `cppo validate` Lightning logs them itself and prints them as a table (it shows
        # only what goes to the logger).
        validating = self.module.trainer.state.fn == TrainerFn.VALIDATING
        for logger in [] if validating else self.module.loggers:
            logger.log_metrics(
                {k: float(v) for k, v in metrics.items()}, step=self.module.global_step
            )
        if not self.module.trainer.sanity_checking:
            # Already global (torchmetrics syncs in compute); sync_dist only keeps ranks in step.
            self.module.log_dict(
                metrics, logger=validating, sync_dist=True
            )  # for callbacks and the bar
