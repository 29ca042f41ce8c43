"""VPPO ("Spotlight on Token Perception", arXiv 2510.09285): three components at three seams.

Every response token is scored by its visual dependency, how much the rollout-time policy's
log-prob of it moves when the image is patch-masked (``visual_dependency(old_logp,
removed_logp)``, computed once per rollout batch without gradient: both are
:attr:`~cppo_lightning.seams.Component.needs`). Then:

- :class:`DependencyShaping` (``model.advantage``) scales each response's advantage by its mean
  dependency, mapped into ``[scale_min, top]`` over the mini-batch (scales average to 1);
- :class:`DependentTokens` (``model.token_weighting``) keeps the policy gradient on the top 40%
  most dependent tokens of each response;
- :class:`EntropyPenalty` (``model.extra_losses``) adds ``coef * mean(-logp)``.

The math is in :mod:`cppo_lightning.losses.vppo`; the overlay ``configs/experiments/vppo.yaml``
turns the method on with the authors' patch mask as ``data.removing_view``. Every default below is
read from the authors' code, ``huaixuheqing/VPPO-RL`` (an EasyR1 fork; HEAD a23c54b):
``verl/workers/actor/dp_actor.py`` ``DataParallelPPOActor.update_policy`` and
``examples/configs/train_vppo_7b.sh`` / ``train_vppo_8b.sh`` (docs/methods-sources.md, "VPPO").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

import torch
from torch import Tensor

from cppo_lightning.losses.grpo import aggregate
from cppo_lightning.losses.token_selection import selection_stats, selection_threshold
from cppo_lightning.losses.vppo import (
    trajectory_dependency,
    visual_dependency,
    vppo_advantage_scale,
    vppo_token_mask,
)
from cppo_lightning.seams import AdvantageTransform, LossTerm, TokenWeighting

if TYPE_CHECKING:
    from cppo_lightning.perception import MicroBatch
    from cppo_lightning.records import RolloutBatch

__all__ = ["DependencyShaping", "DependentTokens", "EntropyPenalty"]

_NEEDS = frozenset({"old_logp", "removed_logp"})


def _dependency(rollout: RolloutBatch | None, index: Tensor | None = None) -> Tensor:
    """``[n, L]`` visual dependency of the tokens of ``rollout``'s responses ``index`` (all
    when None), no grad."""
    if rollout is None or rollout.old_logp is None or rollout.removed_logp is None:
        raise RuntimeError(
            "VPPO's components need old_logp and removed_logp on the rollout batch: they are "
            "computed by PolicyUpdate.prepare_update when the component's needs ask for them "
            "(and data.removing_view is set)."
        )
    old_logp, removed_logp = rollout.old_logp, rollout.removed_logp  # [N, L]
    if index is not None:
        old_logp, removed_logp = old_logp[index], removed_logp[index]  # [n, L]
    return visual_dependency(old_logp, removed_logp)  # [n, L]


class DependentTokens(TokenWeighting):
    """VPPO's token gradient filter: the policy gradient on the ``top_fraction`` most visually
    dependent tokens of each response only.

    ``dep = k3(removed_logp - old_logp)`` clamped to ``[0, 10]`` per token
    (:func:`~cppo_lightning.losses.vppo.visual_dependency`), then exactly
    ``ceil(top_fraction * n)`` tokens of each response's ``n`` (:func:`vppo_token_mask`).

    Defaults and where they come from:

    - ``top_fraction = 0.4``: ``top_p_perception_tokens`` in both released scripts
      (``train_vppo_7b.sh``, ``train_vppo_8b.sh``); the config class default is 0.2.
    - ``normalise = "all"``: the authors' ``compute_policy_loss(loss_token_mask=...)`` multiplies
      the per-token loss by the mask and ``average_loss(..., response_mask)`` divides by every
      valid token.

    Where this differs from the authors' code: ties at the threshold go to the earlier token
    (``torch.sort``'s order is unspecified there).

    Logs (as ``train/tokens/<key>``; the authors' ``actor/...`` name in brackets): ``fraction``
    (``perception_token_fraction``), ``threshold`` (``low_var_kl_threshold``: the mean over
    responses of the lowest selected dependency), ``selected_mean`` and ``rejected_mean``
    (``low_var_kl_mean_selected`` / ``_rejected``; NaN when there are none) and
    ``dependency_mean`` (every valid token).

    Args:
        top_fraction: The fraction of each response's valid tokens kept, in (0, 1].
        normalise: ``"all"`` (the authors) or ``"selected"``.
    """

    needs: ClassVar[frozenset[str]] = _NEEDS

    def __init__(
        self, top_fraction: float = 0.4, normalise: Literal["selected", "all"] = "all"
    ) -> None:
        if isinstance(top_fraction, bool) or not (
            isinstance(top_fraction, (int, float)) and 0.0 < top_fraction <= 1.0
        ):
            raise ValueError(
                f"model.token_weighting.top_fraction must be in (0, 1] (the authors' scripts "
                f"use 0.4), got {top_fraction!r}."
            )
        if normalise not in ("selected", "all"):
            raise ValueError(
                f"model.token_weighting.normalise must be 'all' (the authors) or 'selected', "
                f"got {normalise!r}."
            )
        self.top_fraction = float(top_fraction)
        self.normalise = normalise

    def __call__(self, batch: MicroBatch) -> tuple[Tensor, dict[str, Tensor]]:
        mask = batch.response_mask  # [n, L]
        dependency = _dependency(batch.rollout)  # [n, L]
        selected = vppo_token_mask(dependency, mask, self.top_fraction)  # bool [n, L]
        stats = selection_stats(dependency, mask, selected)
        stats["threshold"] = selection_threshold(dependency, mask, selected, per_response=True)
        valid = mask.bool()
        stats["dependency_mean"] = dependency[valid].sum() / valid.sum().clamp(min=1)
        return selected, stats


class DependencyShaping(AdvantageTransform):
    """VPPO's trajectory advantage shaping: each response's advantage times a scale that grows
    with its mean visual dependency.

    Over the mini-batch's responses with tokens, with ``s_i`` the mean dependency of response
    ``i`` (:func:`~cppo_lightning.losses.vppo.trajectory_dependency`) and ``low``/``high`` their
    min and max::

        u_i = (s_i - low) / (high - low),   top = scale_min + (1 - scale_min) / (mean(u) + 1e-8)
        A_i <- A_i * (scale_min + u_i * (top - scale_min))

    so the least dependent response keeps ``scale_min`` of its advantage, the most dependent
    gets ``top`` (> 1), and the scales average to 1. Every scale is 1 when ``high - low <= 1e-6``
    or fewer than two responses have tokens
    (:func:`~cppo_lightning.losses.vppo.vppo_advantage_scale`).

    Defaults and where they come from: ``scale_min = 0.9`` is ``advantage_scaling_min`` in both
    released scripts (the config class default is 0.8).

    Where this differs from the authors' code: they take ``low``/``high`` over the mini-batch on
    each rank (as here) but ``mean(u)`` over each micro-batch; here ``mean(u)`` is over the
    mini-batch too, because the seam runs once per mini-batch. The two are identical when a
    mini-batch is one micro-batch, as in the default config (``micro_batch_size`` 64 >= 32
    responses per mini-batch); otherwise here the scales average to 1 over the mini-batch
    rather than over each micro-batch.

    Logs (as ``train/advantage/<key>``; the authors' ``actor/...`` name in brackets):
    ``score_mean`` (``sensitivity_score_mean``), ``score_low`` / ``score_high``
    (``global_sensitivity_score_min`` / ``_max``), ``scale_max`` (``dynamic_scaling_max``; 1
    when shaping is off) and ``scale_mean`` (``scaling_factor_mean``); ``score_low`` and
    ``score_high`` are NaN when fewer than two responses have tokens.

    Args:
        scale_min: The scale of the least dependent response, in [0, 1].
    """

    needs: ClassVar[frozenset[str]] = _NEEDS

    def __init__(self, scale_min: float = 0.9) -> None:
        if isinstance(scale_min, bool) or not (
            isinstance(scale_min, (int, float)) and 0.0 <= scale_min <= 1.0
        ):
            raise ValueError(
                f"model.advantage.scale_min must be in [0, 1] (the authors' scripts use 0.9), "
                f"got {scale_min!r}."
            )
        self.scale_min = float(scale_min)

    def __call__(self, rollout: RolloutBatch, index: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        assert rollout.advantages is not None
        mask = rollout.response_mask[index]  # [n, L]
        scores = trajectory_dependency(_dependency(rollout, index), mask)  # [n]
        scale, stats = vppo_advantage_scale(
            scores, scale_min=self.scale_min, valid=mask.bool().any(dim=1)
        )  # [n]
        advantages = rollout.advantages[index]  # [n] or [n, L]
        if advantages.dim() == 2:
            scale = scale.unsqueeze(1)  # [n, 1]
        return advantages * scale.to(advantages.dtype), stats


class EntropyPenalty(LossTerm):
    """VPPO's entropy penalty: ``+ coef * mean(-logp)``, the sampled-token estimate of the
    policy's entropy, added to the loss (so minimising the loss lowers the entropy).

    The authors' ``update_policy``: ``entropy_loss = -masked_mean(log_probs, response_mask)``,
    ``loss = loss + entropy_loss * entropy_penalty_coef``. ``coef = 0.06`` is the 7B script's
    ``entropy_penalty_coef`` (``train_vppo_7b.sh``; the 8B script uses 0.12).

    Where this differs from the authors' code: the mean is the run's ``model.loss_agg``
    (``batch.loss_agg``); theirs is a token mean, the same under the default ``token-mean``.

    Logs (as ``train/entropy/<key>``): ``estimate`` (the aggregated ``-logp``, the authors'
    quantity before the coefficient) and ``loss`` (``coef * estimate``).

    Args:
        coef: Weight of the penalty, >= 0.
    """

    name: ClassVar[str] = "entropy"

    def __init__(self, coef: float = 0.06) -> None:
        if coef < 0:
            raise ValueError(
                f"model.extra_losses EntropyPenalty.coef must be >= 0 (the authors' 7B script "
                f"uses 0.06), got {coef}."
            )
        self.coef = float(coef)

    def __call__(self, batch: MicroBatch) -> tuple[Tensor, dict[str, Tensor]]:
        estimate = aggregate(
            -batch.logp, batch.response_mask, batch.loss_agg, batch.agg_constant
        )  # [], with the graph
        loss = self.coef * estimate
        with torch.no_grad():
            stats = {"estimate": estimate.detach(), "loss": loss.detach()}
        return loss, stats
