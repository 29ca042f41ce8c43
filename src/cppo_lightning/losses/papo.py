"""PAPO's implicit perception loss (docs/method.md §5, arXiv 2507.06448), for baseline runs.

PAPO adds to GRPO/DAPO ``-gamma * KL(pi(.|I) || pi(.|I_mask))``, where ``I_mask`` blacks out
random image patches: minimising it *maximises* how much the policy's sampled tokens depend on
the image. Unlike CPPO's contrastive loss it applies to every valid token of every rollout and is
unbounded above apart from the k3 clamp, which is the loss-hacking risk PAPO's double-entropy
penalty (``token_entropy`` on both branches, aggregated and added with small positive
coefficients) is there to contain::

    prcp, stats = implicit_perception_loss(logp, logp_masked, response_mask)
    loss = pg + 0.01 * kl + gamma * prcp          # gamma ~ 0.01-0.02
"""

from __future__ import annotations

import torch
from torch import Tensor

from cppo_lightning.losses.grpo import aggregate, kl_estimate

__all__ = ["implicit_perception_loss"]


def implicit_perception_loss(
    logp: Tensor,
    logp_masked: Tensor,
    mask: Tensor,
    *,
    agg: str = "token-mean",
    agg_constant: float | None = None,
    kind: str = "k3",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Negative KL(pi(.|I) || pi(.|I_mask)) over all valid response tokens (PAPO).

    ``loss = -aggregate(kl_estimate(logp, logp_masked, kind), mask, agg, agg_constant)``; with the
    default k3 the per-token estimate is ``d = clamp(logp_masked - logp, -20, 20)``,
    ``clamp(exp(d) - d - 1, -10, 10)``, the same estimator (and argument roles: the original
    view is the anchor, the masked view the reference) as PAPO's ``low_var_kl``. Gradients flow
    into both branches; pass ``logp_masked.detach()`` to train through the original view only
    (PAPO's default, where the masked log-probs are computed once without gradient).

    Args:
        logp: Log-probs of the sampled tokens given the original image I.
        logp_masked: The same given the patch-masked image ``I_mask``.
        mask: Response mask; non-zero (or True) marks a valid token.
        agg: Aggregation, see :func:`cppo_lightning.losses.aggregate`.
        agg_constant: The ``constant`` of ``agg="seq-sum-constant"``.
        kind: KL estimator, ``"k3"`` (default), ``"k1"`` or ``"k2"``.

    Returns:
        ``(loss, stats)``: the scalar loss to *add* (scaled by gamma) to the objective, and
        ``{"kl_prcp": the aggregated KL, detached}`` (so ``kl_prcp = -loss``).

    Raises:
        ValueError: On mismatched shapes, an unknown ``kind`` or ``agg``; see the messages.

    Shape:
        - logp, logp_masked, mask: ``[N, L]``.
        - loss: ``[]`` (scalar); stats values: ``[]``.
    """
    kl = kl_estimate(logp, logp_masked, kind=kind)  # [N, L]
    kl_prcp = aggregate(kl, mask, agg=agg, constant=agg_constant)  # scalar
    loss = -kl_prcp
    with torch.no_grad():
        stats = {"kl_prcp": kl_prcp.detach()}
    return loss, stats
