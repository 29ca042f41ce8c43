"""GRPO building blocks as pure tensor functions (docs/method.md §1).

Everything here works on plain tensors laid out the way a rollout batch is: ``N = B * G``
responses, group-contiguous (rows ``g*G .. g*G + G - 1`` are the G generations of prompt ``g``),
each padded to ``L`` response tokens with a response mask (non-zero = real response token).
No trainer, config or model objects appear, so every function can be tested against numbers
worked out by hand.

The pieces compose into the per-micro-batch objective the paper runs::

    adv = group_advantages(rewards, group_size=G)                   # [N]
    pg, stats = policy_loss(logp, old_logp, adv, mask)              # scalar
    kl = aggregate(kl_estimate(logp, ref_logp, "k3"), mask)         # scalar
    loss = pg + 0.01 * kl
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["aggregate", "group_advantages", "kl_estimate", "policy_loss"]

ADVANTAGE_SCALES = ("group", "batch", "none")
KL_KINDS = ("k1", "k2", "k3")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-sum-constant")

# Bound on a log-ratio before exponentiating: exp(20) ~ 4.9e8 is far beyond any clip range, and
# keeping it finite means a stray -inf/+inf log-prob (e.g. on padding) cannot produce inf/NaN.
_LOG_RATIO_BOUND = 20.0
# The k3 estimator is clamped to this range, as the recipe does, so that one token whose
# log-probs diverge cannot dominate the KL term of a whole micro-batch.
_K3_BOUND = 10.0


def group_advantages(
    rewards: Tensor,
    group_size: int,
    scale: str = "group",
    eps: float = 1e-6,
    batch_std: Tensor | float | None = None,
) -> Tensor:
    """Group-relative advantages: each reward minus its group mean, optionally scaled.

    ``A_i = (r_i - mean_group(r)) / (std_group(r) + eps)`` with the sample (unbiased) standard
    deviation, as ``torch.std`` computes it (docs/method.md §1). A group whose rewards are all
    equal carries no learning signal and gets advantage exactly 0 under every ``scale``; this is
    enforced explicitly rather than left to floating point, where ``r - mean(r)`` of equal values
    need not round to 0.

    Args:
        rewards: One scalar reward per response, group-contiguous.
        group_size: G, the number of generations per prompt; at least 2, since one sample has no
            group baseline.
        scale: ``"group"`` divides by each group's std (default, the paper), ``"batch"`` divides
            by the std of all N rewards (a group-mean baseline with batch-level scaling), and
            ``"none"`` returns ``r - mean_group(r)`` unscaled (Dr. GRPO).
        eps: Added to the std before dividing, so that small-variance groups stay finite.
        batch_std: The std ``"batch"`` divides by, when the batch is larger than ``rewards``
            (under DDP each rank holds part of it: :func:`global_std` of all ranks' rewards);
            the std of ``rewards`` when None.

    Returns:
        The advantage of every response, in the reward dtype (integer and bool rewards are
        promoted to the default float dtype).

    Raises:
        ValueError: If ``rewards`` is not 1-D, ``group_size`` is below 2, N is not a multiple of
            ``group_size``, ``scale`` is unknown, or ``eps`` is negative.

    Shape:
        - rewards: ``[N]`` with ``N = B * G``.
        - output: ``[N]``.
    """
    if rewards.dim() != 1:
        raise ValueError(
            f"rewards must be 1-D [N] (one reward per response), got shape {tuple(rewards.shape)}; "
            "flatten it group-contiguously first."
        )
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(
            f"group_size must be an int >= 2 (a group baseline needs two samples), got "
            f"{group_size!r}; sample at least 2 generations per prompt."
        )
    n = rewards.shape[0]
    if n % group_size != 0:
        raise ValueError(
            f"the number of rewards ({n}) is not a multiple of group_size ({group_size}); pass "
            f"exactly group_size rewards per prompt (B * {group_size} in all) or fix group_size."
        )
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale must be one of {ADVANTAGE_SCALES}, got {scale!r}.")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}.")

    if not rewards.is_floating_point():
        rewards = rewards.to(torch.get_default_dtype())
    grouped = rewards.view(-1, group_size)  # [B, G]
    centered = grouped - grouped.mean(dim=1, keepdim=True)  # [B, G]

    if scale == "group":
        adv = centered / (grouped.std(dim=1, keepdim=True) + eps)  # [B, G]
    elif scale == "batch":
        std = rewards.std() if batch_std is None else batch_std
        adv = centered / (std + eps)  # [B, G]
    else:
        adv = centered

    # Equal rewards => exactly 0: the mean of equal floats can differ from them in the last bit,
    # and dividing that residue by a std of ~0 + eps would turn it into a spurious advantage.
    constant = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)  # [B, 1]
    adv = torch.where(constant, torch.zeros_like(adv), adv)  # [B, G]
    return adv.reshape(n)


def global_std(count: Tensor, total: Tensor, total_squares: Tensor) -> Tensor:
    """The sample (unbiased) std of values known only through their count, sum and sum of
    squares, e.g. summed over DDP ranks: ``sqrt((sum x^2 - (sum x)^2 / n) / (n - 1))``.

    Shape:
        all inputs and the output: ``[]``.
    """
    variance = (total_squares - total.square() / count) / (count - 1).clamp(min=1)
    return variance.clamp(min=0).sqrt()


def kl_estimate(logp: Tensor, ref_logp: Tensor, kind: str = "k3") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the log-probs of the sampled tokens.

    - ``k3`` (default): ``d = clamp(ref_logp - logp, -20, 20)``,
      ``clamp(exp(d) - d - 1, -10, 10)``. Unbiased, non-negative and low-variance; the clamps
      keep one diverging token from exploding the KL term.
    - ``k1``: ``logp - ref_logp``. Unbiased but can be negative per token.
    - ``k2``: ``0.5 * (logp - ref_logp) ** 2``. Biased, non-negative.

    Args:
        logp: Log-probability of each sampled token under the current policy.
        ref_logp: The same under the frozen reference policy.
        kind: ``"k1"``, ``"k2"`` or ``"k3"``.

    Returns:
        The per-token estimate; padding positions hold whatever their inputs give and must be
        masked by the caller (e.g. with :func:`aggregate`).

    Raises:
        ValueError: If the shapes differ or ``kind`` is unknown.

    Shape:
        - logp, ref_logp: ``[N, L]`` (any shape works as long as both match).
        - output: same as ``logp``.
    """
    if logp.shape != ref_logp.shape:
        raise ValueError(
            f"logp and ref_logp must have the same shape, got {tuple(logp.shape)} and "
            f"{tuple(ref_logp.shape)}; compute both on the same padded responses."
        )
    if kind == "k3":
        d = torch.clamp(ref_logp - logp, -_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)  # [N, L]
        return torch.clamp(torch.exp(d) - d - 1.0, -_K3_BOUND, _K3_BOUND)  # [N, L]
    if kind == "k1":
        return logp - ref_logp  # [N, L]
    if kind == "k2":
        return 0.5 * (logp - ref_logp).square()  # [N, L]
    raise ValueError(f"kind must be one of {KL_KINDS}, got {kind!r}.")


def aggregate(
    values: Tensor,
    mask: Tensor,
    agg: str = "token-mean",
    constant: float | None = None,
) -> Tensor:
    """Reduce per-token values to a scalar over the valid tokens of a micro-batch.

    - ``"token-mean"`` (default, the recipe): ``sum(v * m) / max(sum(m), 1)``; every valid token
      weighs the same, so long responses weigh more.
    - ``"seq-mean-token-mean"`` (textbook GRPO): the mean over responses with at least one valid
      token of each response's token mean; every response weighs the same.
    - ``"seq-sum-constant"`` (Dr. GRPO): ``sum(v * m) / (N * constant)``, with ``constant`` e.g.
      the maximum response length; the normaliser does not depend on the lengths sampled, which
      removes the length bias of the two means.

    Masked-out positions are replaced by 0 before summing (not multiplied by 0), so padding that
    holds inf or NaN cannot leak into the result.

    Args:
        values: Per-token values, e.g. per-token losses.
        mask: Response mask; non-zero (or True) marks a valid token.
        agg: One of ``"token-mean"``, ``"seq-mean-token-mean"``, ``"seq-sum-constant"``.
        constant: The normaliser of ``"seq-sum-constant"``; required (and > 0) there, ignored
            otherwise.

    Returns:
        A scalar tensor; 0 when no token is valid.

    Raises:
        ValueError: If the shapes differ or are not 2-D, ``agg`` is unknown, or
            ``"seq-sum-constant"`` is asked for without a positive ``constant``.

    Shape:
        - values, mask: ``[N, L]``.
        - output: ``[]`` (scalar).
    """
    if values.dim() != 2 or values.shape != mask.shape:
        raise ValueError(
            f"values and mask must both be [N, L] with the same shape, got {tuple(values.shape)} "
            f"and {tuple(mask.shape)}."
        )
    if agg not in AGGREGATIONS:
        raise ValueError(f"agg must be one of {AGGREGATIONS}, got {agg!r}.")

    valid = mask.bool()  # [N, L]
    masked = torch.where(valid, values, torch.zeros_like(values))  # [N, L]

    if agg == "token-mean":
        # clamp(min=1): an all-padding micro-batch yields 0 instead of 0/0.
        return masked.sum() / valid.sum().clamp(min=1)
    if agg == "seq-mean-token-mean":
        lengths = valid.sum(dim=1)  # [N]
        per_seq = masked.sum(dim=1) / lengths.clamp(min=1)  # [N]
        # Empty responses would otherwise count as a 0 and drag the mean towards 0.
        has_tokens = lengths > 0  # [N]
        return per_seq.sum() / has_tokens.sum().clamp(min=1)
    # seq-sum-constant
    if constant is None:
        raise ValueError(
            "agg='seq-sum-constant' needs constant= (e.g. the maximum response length); pass it "
            "or choose agg='token-mean'."
        )
    if constant <= 0:
        raise ValueError(f"constant must be > 0 for agg='seq-sum-constant', got {constant!r}.")
    return masked.sum() / (values.shape[0] * constant)


def check_clip_settings(
    clip_low: float, clip_high: float, dual_clip: float | None, prefix: str = ""
) -> None:
    """Refuse clip ranges :func:`policy_loss` cannot use; ``prefix`` names where the settings
    live in messages (``model.`` when the module checks them at construction)."""
    if not 0.0 <= clip_low < 1.0:
        raise ValueError(
            f"{prefix}clip_low must be in [0, 1) so that the lower bound 1 - clip_low stays "
            f"positive, got {clip_low!r}."
        )
    if clip_high < 0.0:
        raise ValueError(f"{prefix}clip_high must be >= 0, got {clip_high!r}.")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(
            f"{prefix}dual_clip must be > 1 (the recipe uses 3.0; a cap at or below 1 would clip "
            f"unmoved tokens), got {dual_clip!r}; pass dual_clip=None to disable it."
        )


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = 3.0,
    agg: str = "token-mean",
    agg_constant: float | None = None,
    weight: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO/GRPO clipped surrogate with dual clip, aggregated over valid tokens.

    Per token, with ``rho = exp(logp - old_logp)`` (log-ratio clamped to [-20, 20] first)::

        l = max(-A * rho, -A * clip(rho, 1 - clip_low, 1 + clip_high))
        l = min(l, -A * dual_clip)   where A < 0

    The max is PPO's pessimistic bound: once the ratio has moved past the trust region in the
    direction the advantage rewards, the clipped branch is constant and the token stops pushing.
    For A < 0 the max alone is unbounded in rho (``-A * rho`` grows without limit), so the dual
    clip caps it at ``-A * dual_clip``; there too the gradient is 0. ``clip_high > clip_low``
    gives DAPO's clip-higher.

    Args:
        logp: Log-probs of the sampled tokens under the policy being optimised (carries grad).
        old_logp: The same under the policy that generated the rollouts (computed without grad).
        advantages: One advantage per response (broadcast over tokens) or per token.
        mask: Response mask; non-zero (or True) marks a valid token.
        clip_low: Lower clip range, ``rho >= 1 - clip_low``; in [0, 1).
        clip_high: Upper clip range, ``rho <= 1 + clip_high``; >= 0.
        dual_clip: The cap ``c`` for negative advantages, > 1; None disables the dual clip.
        agg: Aggregation, see :func:`aggregate`.
        agg_constant: The ``constant`` of ``agg="seq-sum-constant"``.
        weight: Per-token weights ``[N, L]`` the per-token losses are multiplied by before
            aggregating over ``mask`` (a token weighting that keeps the full normaliser, see
            :class:`cppo_lightning.seams.TokenWeighting`); None weighs every token 1.

    Returns:
        ``(loss, stats)``: the scalar loss, and detached scalars for logging, each a mean over
        valid tokens: ``"clip_frac"`` (the clipped branch is active, ``l2 > l1``),
        ``"dual_clip_frac"`` (the dual clip is active), ``"ratio_mean"``, ``"approx_kl"`` (the k1
        estimate ``old_logp - logp`` of KL(pi_old || pi); unbiased since the tokens were sampled
        from pi_old, but it can come out negative on a finite batch), and ``"loss"``.

    Raises:
        ValueError: On mismatched shapes or out-of-range clip arguments; see the messages.

    Shape:
        - logp, old_logp, mask: ``[N, L]``.
        - advantages: ``[N]`` or ``[N, L]``.
        - loss: ``[]`` (scalar); every stats value: ``[]``.
    """
    if logp.dim() != 2 or logp.shape != old_logp.shape or logp.shape != mask.shape:
        raise ValueError(
            f"logp, old_logp and mask must all be [N, L] with the same shape, got "
            f"{tuple(logp.shape)}, {tuple(old_logp.shape)} and {tuple(mask.shape)}."
        )
    if advantages.shape == logp.shape[:1]:
        advantages = advantages.unsqueeze(-1)  # [N, 1], broadcasts over the L tokens
    elif advantages.shape != logp.shape:
        raise ValueError(
            f"advantages must be [N] (one per response) or [N, L] (one per token) with "
            f"[N, L] = {tuple(logp.shape)}, got {tuple(advantages.shape)}."
        )
    check_clip_settings(clip_low, clip_high, dual_clip)

    log_ratio = torch.clamp(logp - old_logp, -_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)  # [N, L]
    ratio = torch.exp(log_ratio)  # [N, L]
    loss_unclipped = -advantages * ratio  # [N, L]
    loss_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)  # [N, L]
    per_token = torch.maximum(loss_unclipped, loss_clipped)  # [N, L]

    if dual_clip is not None:
        negative = advantages < 0  # [N, 1] or [N, L]
        cap = -advantages * dual_clip  # [N, 1] or [N, L]; constant in logp -> no gradient
        dual_active = negative & (per_token > cap)  # [N, L]
        per_token = torch.where(negative, torch.minimum(per_token, cap), per_token)  # [N, L]
    else:
        dual_active = torch.zeros_like(per_token, dtype=torch.bool)  # [N, L]

    if weight is not None:
        if weight.shape != per_token.shape:
            raise ValueError(
                f"weight must be [N, L] = {tuple(per_token.shape)}, got {tuple(weight.shape)}."
            )
        per_token = per_token * weight.to(per_token.dtype)  # [N, L]
    loss = aggregate(per_token, mask, agg=agg, constant=agg_constant)

    with torch.no_grad():
        valid = mask.bool()  # [N, L]
        count = valid.sum().clamp(min=1)

        def token_mean(x: Tensor) -> Tensor:
            # Always a token mean, whatever ``agg`` is: these are diagnostics, not the objective.
            return torch.where(valid, x, torch.zeros_like(x)).sum() / count

        dtype = per_token.dtype
        stats = {
            "clip_frac": token_mean((loss_clipped > loss_unclipped).to(dtype)),
            "dual_clip_frac": token_mean(dual_active.to(dtype)),
            "ratio_mean": token_mean(ratio.detach()),
            "approx_kl": token_mean(-log_ratio.detach()),
            "loss": loss.detach(),
        }
    return loss, stats
