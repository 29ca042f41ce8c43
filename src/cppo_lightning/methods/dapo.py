"""DAPO (arXiv 2503.14476): dynamic sampling at ``rollout.filter``, overlong filtering at
``model.token_weighting``.

DAPO's other changes need no component of their own: clip-higher is ``model.clip_high: 0.28``,
the token-level loss is ``model.loss_agg: token-mean`` (the default), "no reference KL" is
``model.kl_coef: 0``, and the soft overlong punishment is a reward term
(:class:`cppo_lightning.rewards_dapo.OverlongPenalty`). ``configs/experiments/dapo.yaml`` turns
the method on; the math is :mod:`cppo_lightning.losses.dapo`, the sources
``docs/methods-sources.md`` ("DAPO").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from cppo_lightning.losses.dapo import drop_truncated, informative_groups
from cppo_lightning.seams import RolloutFilter, TokenWeighting

if TYPE_CHECKING:
    from cppo_lightning.perception import MicroBatch
    from cppo_lightning.records import RolloutBatch

__all__ = ["DropTruncated", "DynamicSampling"]


class DynamicSampling(RolloutFilter):
    """DAPO's dynamic sampling: train only on groups whose ``metric`` is not the same for every
    response (a group of equal rewards has advantage 0 everywhere), sampling more prompts until
    the rollout batch holds ``data.batch_size`` such groups.

    The rollout callback (:class:`~cppo_lightning.callbacks.RolloutCallback`) runs the rounds:
    the training batch first, then ``data.batch_size`` more prompts per extra round
    (:meth:`~cppo_lightning.data.VisionLanguageDataModule.extra_prompts`), keeping the first
    ``data.batch_size`` informative groups in generation order. When ``max_rounds`` rounds did
    not find them, the batch is filled with the first dropped groups (no gradient signal, but
    every DDP rank trains on the same number of groups) and ``rollout/sampling_cap_hit`` is 1.
    Under DDP every rank runs as many rounds as the rank that needs the most.

    Defaults and where they come from (``docs/methods-sources.md``, "DAPO"):

    - ``metric = "accuracy"``: the paper's Eq. (11) keeps a prompt when ``0 < #correct < G``;
      verl's recipe filters on ``acc`` (``filter_groups.metric=acc``). ``"reward"`` filters on
      the total reward (issue 31's wording "rewards all equal"); the two differ when the
      responses of an all-correct group differ in format. Any reward term's name works.
    - ``max_rounds = 10``: verl's ``max_num_gen_batches=10`` (the first round counts).

    Where this differs from verl's ``recipe/dapo/dapo_ray_trainer.py``: each round generates
    ``data.batch_size`` prompts (verl: ``gen_batch_size = 3 x train_batch_size``); the extra
    prompts are drawn beside the epoch's order, seeded by (``data.view_seed``, step, round,
    rank), not taken from the data loader's stream, so an epoch still has the same batches and a
    resumed run draws the same prompts; hitting the cap fills the batch and logs it where verl
    raises an error.

    Logs: ``rollout/sampling_rounds``, ``rollout/dropped_groups`` (groups filtered out over the
    rounds of the step), ``rollout/sampling_cap_hit``, ``rollout/filled_groups`` (dropped groups
    trained on because of the cap).

    Args:
        metric: The reward term whose values must vary within a group, or ``"reward"`` for
            the weighted total.
        max_rounds: Most generation rounds per training batch, the first included (>= 1).
    """

    def __init__(self, metric: str = "accuracy", max_rounds: int = 10) -> None:
        if isinstance(max_rounds, bool) or not isinstance(max_rounds, int) or max_rounds < 1:
            raise ValueError(
                f"rollout.filter.max_rounds must be an int >= 1 (generation rounds per batch, "
                f"the first included; DAPO's recipe uses 10), got {max_rounds!r}."
            )
        self.metric = metric
        self.max_rounds = max_rounds

    def keep(self, rollout: RolloutBatch) -> Tensor:
        if self.metric == "reward":
            values = rollout.rewards
        elif self.metric in rollout.reward_terms:
            values = rollout.reward_terms[self.metric]
        else:
            raise ValueError(
                f"rollout.filter.metric={self.metric!r} is not a reward term "
                f"({sorted(rollout.reward_terms)}) nor 'reward' (the total): set it to one."
            )
        return informative_groups(values, rollout.group_size)  # [B]


class DropTruncated(TokenWeighting):
    """DAPO's overlong filtering: responses cut by ``rollout.max_new_tokens`` (no end of
    sequence) carry no policy gradient, and the token mean runs over the other responses'
    tokens only (``normalise = "selected"``: their tokens leave the loss mask, paper §3.4).

    Off in DAPO's recipe (verl ``docs/algo/dapo.md``: the soft overlong punishment replaces
    it), so ``configs/experiments/dapo.yaml`` leaves it out; turn it on with
    ``--model.token_weighting=cppo_lightning.methods.DropTruncated``. The truncation flag is
    ``RolloutBatch.truncated``, set by the rollout.

    Logs (as ``train/tokens/<key>``): ``truncated_fraction``, the micro-batch's share of cut
    responses (``rollout/truncated_fraction`` is the rollout batch's).
    """

    normalise: Literal["selected", "all"] = "selected"

    def __call__(self, batch: MicroBatch) -> tuple[Tensor, dict[str, Tensor]]:
        rollout = batch.rollout
        if rollout is None or rollout.truncated is None:
            raise ValueError(
                "DropTruncated needs RolloutBatch.truncated, which this rollout did not record: "
                "collect rollouts with cppo_lightning.rollout.collect_rollouts."
            )
        truncated = rollout.truncated.to(batch.response_mask.device)  # [n]
        weight = drop_truncated(batch.response_mask.bool(), truncated)  # [n, L]
        return weight, {"truncated_fraction": truncated.to(torch.float32).mean()}
