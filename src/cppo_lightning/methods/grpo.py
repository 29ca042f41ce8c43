"""GRPO's policy loss: the PPO clipped surrogate with a per-token importance ratio.

The default of the ``model.policy_loss`` seam, built from ``model.clip_low``, ``model.clip_high``
and ``model.dual_clip`` when ``model.policy_loss`` is null. The math is
:func:`cppo_lightning.losses.policy_loss`.
"""

from __future__ import annotations

from torch import Tensor

from cppo_lightning.losses.grpo import check_clip_settings, policy_loss
from cppo_lightning.seams import PolicyLoss


class ClippedTokenRatio(PolicyLoss):
    """PPO/GRPO surrogate: ``rho_t = pi(y_t) / pi_old(y_t)`` per token, clipped to
    ``[1 - clip_low, 1 + clip_high]``, with the dual clip for negative advantages.

    Args:
        clip_low: eps_low.
        clip_high: eps_high (> clip_low is DAPO's clip-higher).
        dual_clip: The dual-clip constant c (> 1); None disables it.
    """

    def __init__(
        self, clip_low: float = 0.2, clip_high: float = 0.2, dual_clip: float | None = 3.0
    ) -> None:
        check_clip_settings(clip_low, clip_high, dual_clip, prefix="model.policy_loss.")
        self.clip_low, self.clip_high, self.dual_clip = clip_low, clip_high, dual_clip

    def __call__(
        self,
        logp: Tensor,
        old_logp: Tensor,
        advantages: Tensor,
        mask: Tensor,
        *,
        agg: str,
        agg_constant: float | None,
        weight: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        return policy_loss(
            logp,
            old_logp,
            advantages,
            mask,
            clip_low=self.clip_low,
            clip_high=self.clip_high,
            dual_clip=self.dual_clip,
            agg=agg,
            agg_constant=agg_constant,
            weight=weight,
        )
