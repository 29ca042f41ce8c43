"""DAPO's soft overlong punishment as a reward term (arXiv 2503.14476, Eq. 13).

A reward function here is ``f(completions, **columns) -> list[float]`` (see
:mod:`cppo_lightning.rewards`); :class:`~cppo_lightning.rewards.WeightedReward` adds the terms.
The overlong penalty needs each response's length *in tokens*, which the decoded text does not
give back exactly (re-tokenising decoded text need not reproduce the sampled ids), so the term
reads it from a column::

    reward:
      functions:
        accuracy: cppo_lightning.rewards.accuracy_reward
        format: cppo_lightning.rewards.format_reward
        overlong:
          class_path: cppo_lightning.rewards_dapo.OverlongPenalty
          init_args: {max_length: 4096, cache_length: 1024}
      weights: {accuracy: 0.9, format: 0.1, overlong: 1.0}

The rollout (:func:`cppo_lightning.rollout.collect_rollouts`) passes every reward function the
token count of each response (``response_mask.sum(1)``, EOS included) in the column
``response_length`` (:data:`cppo_lightning.rollout.RESPONSE_LENGTH`), the default
``length_column``. A scorer called without it (a caller of its own) makes this term raise, and
:class:`~cppo_lightning.rewards.WeightedReward` stops the run after ``stop_after`` batches with the
message below, rather than training on a silent 0. ``configs/experiments/dapo.yaml`` uses it.

DAPO adds the penalty to the correctness reward with weight 1 (verl's ``DAPORewardManager``:
``reward += overlong_reward``), before the group normalisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from cppo_lightning.losses.dapo import overlong_penalty

__all__ = ["OverlongPenalty"]


class OverlongPenalty:
    """Reward term: DAPO's soft overlong punishment, from each response's token count.

    Args:
        max_length: ``L_max``, the generation limit in tokens; set it to the run's maximum
            response length (paper: 20,480).
        cache_length: ``L_cache``, the soft punishment interval at the end of it
            (paper: 4,096, i.e. 20% of ``L_max``).
        penalty_factor: The penalty at ``L_max`` (paper and verl: 1.0).
        length_column: The column holding each response's number of generated tokens.
    """

    def __init__(
        self,
        max_length: int,
        cache_length: int,
        penalty_factor: float = 1.0,
        length_column: str = "response_length",
    ) -> None:
        # Validates the numbers once, at construction, with overlong_penalty's messages.
        overlong_penalty(torch.zeros(0), max_length, cache_length, penalty_factor=penalty_factor)
        self.max_length = max_length
        self.cache_length = cache_length
        self.penalty_factor = penalty_factor
        self.length_column = length_column

    def __call__(self, completions: Sequence[str], **columns: Any) -> list[float]:
        """Score each response; ``columns[length_column]`` holds its token count.

        Raises:
            KeyError: If the length column is missing (a scorer called without the rollout's
                columns).
            ValueError: If it does not hold one count per response.
        """
        if self.length_column not in columns:
            raise KeyError(
                f"OverlongPenalty needs the token count of each response in the column "
                f"{self.length_column!r}, and the rollout passed only {sorted(columns)}; the "
                "rollout (cppo_lightning.rollout.collect_rollouts) passes it as "
                "'response_length': score through it, or set length_column."
            )
        lengths = columns[self.length_column]
        if len(lengths) != len(completions):
            raise ValueError(
                f"column {self.length_column!r} holds {len(lengths)} values for "
                f"{len(completions)} responses: it needs one token count per response."
            )
        counts = torch.as_tensor([float(n) for n in lengths], dtype=torch.float64)  # [N]
        penalty = overlong_penalty(
            counts, self.max_length, self.cache_length, penalty_factor=self.penalty_factor
        )  # [N]
        return [float(p) for p in penalty]
