"""The Contrastive Perception Loss (CPL, docs/method.md §3) as a pure tensor function.

At each selected perception token (see :mod:`cppo_lightning.detection`) the policy's next-token
distribution given the original image I should stay close to the one given the
information-preserving view I+ and move away from the one given the information-removing view
I-. With ``D+`` and ``D-`` estimates of KL(pi(.|I) || pi(.|I+)) and KL(pi(.|I) || pi(.|I-)), the
per-token loss ``softplus((D+ - D-) / tau)`` is a two-candidate InfoNCE with similarity
``-D / tau``: the positive view must be the more similar one. It is bounded below by 0 and, with
the clamped k3 estimator, its argument is bounded too, so no token can dominate the update::

    selected = perception_token_mask(H, H_neg, response_mask, advantages=adv)  # bool [N, L]
    cpl, stats = contrastive_perception_loss(logp, logp_pos, logp_neg, selected)
    loss = pg + 0.01 * kl + 0.01 * cpl

The tail shared by every divergence, ``[S]`` divergences -> loss and stats, is
:func:`contrast_divergences`; the exact-KL path of training computes ``D+`` and ``D-`` chunk by
chunk through the LM head (:meth:`cppo_lightning.logprobs.ResponseScores.kl_to`, never ``[S, V]``
for all selected tokens at once) and hands them to it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from cppo_lightning.losses.grpo import kl_estimate

__all__ = ["DIVERGENCES", "contrast_divergences", "contrastive_perception_loss", "full_kl"]

DIVERGENCES = ("k3", "k1", "kl")

# Added to the selected-token count in the denominator, as the recipe does.
_COUNT_EPS = 1e-8


def full_kl(anchor: Tensor, other: Tensor) -> Tensor:
    """Exact KL(p || q) over the last dimension from log-probabilities ``anchor``, ``other``.

    Entries with ``p = 0`` (e.g. ``anchor = -inf`` on a masked vocabulary entry) contribute 0;
    their log-ratio is replaced by 0 before multiplying so that the gradient stays finite too.

    Shape:
        - anchor, other: ``[S, V]``.
        - output: ``[S]``.
    """
    p = anchor.exp()  # [S, V]
    log_ratio = torch.where(p > 0, anchor - other, torch.zeros_like(anchor))  # [S, V]
    return (p * log_ratio).sum(dim=-1)  # [S]


def _check_tau(tau: float) -> None:
    if not (isinstance(tau, (int, float)) and math.isfinite(tau)) or tau <= 0:
        raise ValueError(f"tau must be a finite number > 0 (the recipe uses 0.1), got {tau!r}.")


def contrast_divergences(
    d_pos: Tensor, d_neg: Tensor, *, tau: float = 0.1
) -> tuple[Tensor, dict[str, Tensor]]:
    """The CPL from the divergences of the S selected tokens: ``softplus((D+ - D-) / tau)``,
    summed and divided by ``S + 1e-8``.

    The tail of :func:`contrastive_perception_loss`, shared with the chunked exact-KL path
    (:meth:`cppo_lightning.logprobs.ResponseScores.kl_to`), which computes ``D+`` and ``D-``
    without holding full distributions for all S tokens.

    Args:
        d_pos: ``D+``, the divergence of the I+ view from the anchor at each selected token.
        d_neg: ``D-``, the same for the I- view.
        tau: The InfoNCE temperature; > 0 (the recipe uses 0.1).

    Returns:
        ``(loss, stats)`` as :func:`contrastive_perception_loss` returns them.

    Raises:
        ValueError: If ``tau`` is not positive and finite, or the shapes are not both ``[S]``.

    Shape:
        - d_pos, d_neg: ``[S]``.
        - loss: ``[]``; every stats value: ``[]``.
    """
    _check_tau(tau)
    if d_pos.dim() != 1 or d_pos.shape != d_neg.shape:
        raise ValueError(
            f"d_pos and d_neg must both be [S] (one divergence per selected token), got "
            f"{tuple(d_pos.shape)} and {tuple(d_neg.shape)}."
        )
    per_token = F.softplus((d_pos - d_neg) / tau)  # [S]
    count = per_token.new_tensor(float(per_token.numel()))
    # An empty selection sums an empty tensor: exactly 0, still attached to the graph.
    loss = per_token.sum() / (count + _COUNT_EPS)

    with torch.no_grad():
        denom = count.clamp(min=1.0)
        stats = {
            "cpl": loss.detach(),
            "d_pos": d_pos.detach().sum() / denom,
            "d_neg": d_neg.detach().sum() / denom,
            "selected_tokens": count.detach(),
            "contrast_accuracy": (d_pos < d_neg).to(per_token.dtype).sum() / denom,
        }
    return loss, stats


def contrastive_perception_loss(
    logp: Tensor,
    logp_pos: Tensor,
    logp_neg: Tensor,
    mask: Tensor,
    *,
    tau: float = 0.1,
    divergence: str = "k3",
    stop_gradient_anchor: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Contrastive Perception Loss over the selected tokens of a micro-batch (docs/method.md §3).

    Per selected token, with the anchor ``logp`` (view I) and the other views ``logp_pos`` (I+)
    and ``logp_neg`` (I-)::

        D+ = D(anchor=logp, other=logp_pos),  D- = D(anchor=logp, other=logp_neg)
        l  = softplus((D+ - D-) / tau)
        L  = sum(mask * l) / (sum(mask) + 1e-8)

    Divergences ``D``:

    - ``"k3"`` (default, the recipe): the clamped k3 estimate of KL(pi(.|I) || pi(.|view)) from
      the sampled token, exactly the reference KL's estimator (:func:`kl_estimate`):
      ``d = clamp(other - anchor, -20, 20)``, ``clamp(exp(d) - d - 1, -10, 10)``.
    - ``"k1"``: ``anchor - other``; in ``D+ - D-`` the anchor cancels, leaving
      ``logp_neg - logp_pos``.
    - ``"kl"``: the exact full-vocabulary KL(pi(.|I) || pi(.|view)) at each selected token; the
      three inputs are then the log-softmax of the (temperature-scaled) logits, ``[N, L, V]``.
      Only the selected positions are gathered, so the temporaries are ``[S, V]`` with S the
      number of selected tokens. Training does not build these inputs: it computes the same
      ``[S]`` divergences chunk by chunk from the hidden states
      (:meth:`cppo_lightning.logprobs.ResponseScores.kl_to`) and calls
      :func:`contrast_divergences`.

    Gradients flow through all three branches (only the mask is gradient-free), unless
    ``stop_gradient_anchor`` detaches the anchor. Only the selected positions enter the
    computation (boolean indexing), so padding that holds ``-inf`` or huge log-probs yields
    neither NaN values nor NaN gradients; unselected positions get zero gradient. With nothing
    selected the loss is exactly 0 and still backpropagates (zero gradients).

    Args:
        logp: Log-probs under the original image I (the anchor).
        logp_pos: The same under the information-preserving view I+.
        logp_neg: The same under the information-removing view I-.
        mask: The selected perception tokens (e.g. from
            :func:`cppo_lightning.detection.perception_token_mask`); non-zero (or True) = selected.
        tau: The InfoNCE temperature; > 0 (the recipe uses 0.1).
        divergence: ``"k3"`` (default), ``"k1"`` or ``"kl"``.
        stop_gradient_anchor: Detach ``logp``, so only the I+ and I- branches are trained.

    Returns:
        ``(loss, stats)``: the scalar loss, and detached 0-dim tensors for logging: ``"cpl"``
        (the loss), ``"d_pos"`` and ``"d_neg"`` (the mean ``D+`` and ``D-`` over the selected
        tokens; 0 when none), ``"selected_tokens"`` (their count, as a float) and
        ``"contrast_accuracy"`` (the fraction of selected tokens with ``D+ < D-``; 0 when none).

    Raises:
        ValueError: If ``tau`` is not positive and finite, ``divergence`` is unknown, or the
            shapes do not fit the divergence; see the messages.

    Shape:
        - ``"k3"``, ``"k1"``: logp, logp_pos, logp_neg, mask ``[N, L]``.
        - ``"kl"``: logp, logp_pos, logp_neg ``[N, L, V]``; mask ``[N, L]``.
        - loss: ``[]`` (scalar); every stats value: ``[]``.
    """
    _check_tau(tau)
    if divergence not in DIVERGENCES:
        raise ValueError(
            f"divergence must be one of {DIVERGENCES} ('k3' = clamped one-sample estimate, the "
            f"recipe; 'k1' = log-ratio; 'kl' = exact KL from [N, L, V] log-probs), got "
            f"{divergence!r}."
        )
    if logp.shape != logp_pos.shape or logp.shape != logp_neg.shape:
        raise ValueError(
            f"logp, logp_pos and logp_neg must have the same shape, got {tuple(logp.shape)}, "
            f"{tuple(logp_pos.shape)} and {tuple(logp_neg.shape)}; compute all three views on "
            "the same padded responses."
        )
    if divergence == "kl":
        if logp.dim() != 3 or mask.shape != logp.shape[:2]:
            raise ValueError(
                f"divergence='kl' needs log-probability distributions [N, L, V] and a mask "
                f"[N, L], got {tuple(logp.shape)} and mask {tuple(mask.shape)}; pass "
                "log_softmax(logits / temperature) of each view, or use divergence='k3' with "
                "the sampled tokens' log-probs [N, L]."
            )
    elif logp.dim() != 2 or mask.shape != logp.shape:
        raise ValueError(
            f"divergence={divergence!r} needs the sampled tokens' log-probs [N, L] and a mask of "
            f"the same shape, got {tuple(logp.shape)} and mask {tuple(mask.shape)}; for full "
            "[N, L, V] distributions use divergence='kl'."
        )

    anchor = logp.detach() if stop_gradient_anchor else logp
    selected = mask.detach().bool()  # [N, L]
    # Gather only the selected positions: whatever padding holds never enters the graph.
    anchor_s = anchor[selected]  # [S] ([S, V] for "kl")
    pos_s = logp_pos[selected]  # [S] ([S, V] for "kl")
    neg_s = logp_neg[selected]  # [S] ([S, V] for "kl")

    if divergence == "kl":
        d_pos = full_kl(anchor_s, pos_s)  # [S]
        d_neg = full_kl(anchor_s, neg_s)  # [S]
    else:
        # kl_estimate(logp, ref_logp) uses d = ref_logp - logp, so other goes second.
        d_pos = kl_estimate(anchor_s, pos_s, kind=divergence)  # [S]
        d_neg = kl_estimate(anchor_s, neg_s, kind=divergence)  # [S]
    return contrast_divergences(d_pos, d_neg, tau=tau)
