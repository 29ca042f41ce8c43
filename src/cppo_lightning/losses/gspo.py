"""GSPO's sequence-level importance ratio and clipped surrogate (arXiv 2507.18071), pure tensors.

GSPO replaces GRPO's per-token ratio with one ratio per response, the length-normalised (geometric
mean) likelihood ratio ``s_i = exp(mean_t(logp - old_logp))`` over the response's valid tokens,
and clips it per response with a range two orders of magnitude narrower than token-level PPO::

    loss, stats = sequence_ratio_loss(logp, old_logp, adv, mask, clip_low=3e-4, clip_high=4e-4)

The training step reaches it through :class:`cppo_lightning.methods.SequenceRatio` at the
``model.policy_loss`` seam (``configs/experiments/gspo.yaml``; docs/methods-sources.md).

Where the defaults come from:

- ``clip_low = 3e-4``, ``clip_high = 4e-4``: the paper's section 5.1 sets the left and right
  clipping ranges of its Eq. (5) to these values, as cited by verl's
  ``examples/gspo_trainer/test_gspo_3b_math.sh`` (``clip_ratio_low=0.0003``,
  ``clip_ratio_high=0.0004``, "as recommended by the paper, see Sec. 5.1") and TRL's
  ``docs/source/paper_index.md`` (``epsilon=3e-4``, ``epsilon_high=4e-4``, "GSPO paper (v2),
  section 5.1"); the PDF itself was not available to us.
- ``agg = "seq-mean-token-mean"``: the paper's objective,
  ``1/G sum_i min(s_i A_i, clip(s_i) A_i)``, is a mean over responses; verl's
  ``compute_policy_loss_gspo`` (``verl/trainer/ppo/core_algos.py``) forces
  ``loss_agg_mode="seq-mean-token-mean"`` whatever the config says.
- no dual clip: neither the paper nor verl's ``compute_policy_loss_gspo`` (which reports
  ``pg_clipfrac_lower = 0``) applies one; ``dual_clip`` is an option here.
- no reference KL: TRL's paper index sets ``beta=0.0`` for GSPO (citing verl PR 2775); that is a
  setting of the run, not of this function.

Where this differs from the public implementations (we found no code released with the paper):
verl computes only the GSPO-token form (its ``log_seq_importance_ratio`` carries
``log_prob - log_prob.detach()``) and clamps the log-ratio at ``max=10``; EasyR1's
``compute_policy_loss`` (``loss_type="gspo"`` / ``"gspo_token"``, as vendored in
``huaixuheqing/VPPO-RL`` ``verl/trainer/core_algos.py``) clamps to ``[-20, 20]``; TRL
(``importance_sampling_level="sequence"``) computes the ratio per sequence without a clamp.
Here both forms exist, and the sequence log-ratio is clamped to ``[-20, 20]`` like
:func:`cppo_lightning.losses.policy_loss` (far outside any clip range, so it only matters for the
unclipped branch of a negative advantage, and only to keep it finite).
"""

from __future__ import annotations

import torch
from torch import Tensor

from cppo_lightning.losses.grpo import aggregate, check_clip_settings

__all__ = ["sequence_log_ratio", "sequence_ratio_loss"]

# The same bound policy_loss puts on a log-ratio before exponentiating.
_LOG_RATIO_BOUND = 20.0


def sequence_log_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """Mean log-ratio over each response's valid tokens: ``log s_i = mean_t(logp - old_logp)``.

    Masked-out positions are replaced by 0 before summing (so padding holding ``-inf`` cannot leak
    in); a response without valid tokens gets 0 (ratio 1). Not clamped.

    Args:
        logp: Log-probs of the sampled tokens under the policy being optimised.
        old_logp: The same under the policy that generated the rollouts.
        mask: Response mask; non-zero (or True) marks a valid token.

    Returns:
        ``log s_i`` per response; differentiable in ``logp`` (and ``old_logp``).

    Shape:
        - logp, old_logp, mask: ``[N, L]``.
        - output: ``[N]``.
    """
    valid = mask.bool()  # [N, L]
    diff = torch.where(valid, logp - old_logp, torch.zeros_like(logp))  # [N, L]
    lengths = valid.sum(dim=1).clamp(min=1)  # [N]
    return diff.sum(dim=1) / lengths  # [N]


def sequence_ratio_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
    token_level: bool = False,
    dual_clip: float | None = None,
    agg: str = "seq-mean-token-mean",
    agg_constant: float | None = None,
    weight: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO (or GSPO-token) clipped surrogate with the sequence-level importance ratio.

    With ``s_i = exp(clamp(mean_t(logp - old_logp), -20, 20))`` over response i's valid tokens:

    - GSPO (``token_level=False``), one loss per response, broadcast to its valid tokens::

          l_i = max(-A_i * s_i, -A_i * clip(s_i, 1 - clip_low, 1 + clip_high))

      so ``d l_i / d logp_t = -A_i * s_i / |y_i|`` inside the clip range (0 outside).
    - GSPO-token (``token_level=True``), per token, with ``sg`` the stop-gradient::

          s_it = sg[s_i] * exp(logp_t - sg[logp_t])          # value s_i, d/dlogp_t = s_i
          l_it = max(-A_it * s_it, -A_it * clip(s_it, 1 - clip_low, 1 + clip_high))

      which lets advantages differ per token. With one advantage per response its value and its
      gradient equal GSPO's under either aggregation (``seq-mean-token-mean``: both give
      ``-A_i s_i / (N' |y_i|)`` per token, N' the responses with tokens; ``token-mean``: both give
      ``-A_i s_i / T``, T the valid tokens), as the paper states for GSPO-token.

    With ``dual_clip=c`` (off by default, see the module docstring), ``l = min(l, -A * c)`` where
    ``A < 0``, as in :func:`cppo_lightning.losses.policy_loss`. The per-token losses are
    multiplied by ``weight`` (when given) and reduced by :func:`cppo_lightning.losses.aggregate`
    over ``mask``. The ratio ``s_i`` always averages over every valid token of ``mask``: a weight
    changes which tokens carry the loss, not the sequence's likelihood ratio.

    Args:
        logp: Log-probs of the sampled tokens under the policy being optimised (carries grad).
        old_logp: The same under the policy that generated the rollouts (no grad).
        advantages: One advantage per response; per token (``[N, L]``) only with
            ``token_level=True``.
        mask: Response mask; non-zero (or True) marks a valid token.
        clip_low: Lower clip range, ``s >= 1 - clip_low``; in [0, 1). Paper: 3e-4.
        clip_high: Upper clip range, ``s <= 1 + clip_high``; >= 0. Paper: 4e-4.
        token_level: GSPO-token instead of GSPO.
        dual_clip: The cap ``c > 1`` for negative advantages; None (default) disables it.
        agg: ``"seq-mean-token-mean"`` (default, paper and verl), ``"token-mean"`` or
            ``"seq-sum-constant"``; see :func:`cppo_lightning.losses.aggregate`.
        agg_constant: The ``constant`` of ``agg="seq-sum-constant"``.
        weight: Per-token weights ``[N, L]`` the per-token losses are multiplied by before
            aggregating over ``mask`` (a token weighting that keeps the full normaliser, see
            :class:`cppo_lightning.seams.TokenWeighting`), as in
            :func:`cppo_lightning.losses.policy_loss`; None weighs every token 1.

    Returns:
        ``(loss, stats)``: the scalar loss and detached scalars: ``"clip_frac"`` (valid tokens
        whose clipped branch is active, the unit of verl's ``pg_clipfrac`` and of
        ``policy_loss``), ``"seq_clip_frac"`` (responses with any clipped token; the same
        responses when advantages are per response), ``"dual_clip_frac"`` (valid tokens),
        ``"ratio_mean"``, ``"ratio_min"``, ``"ratio_max"`` (of ``s_i`` over responses with valid
        tokens; 1 when there are none), ``"approx_kl"`` (token mean of ``old_logp - logp``,
        as ``policy_loss`` reports it) and ``"loss"``.

    Raises:
        ValueError: On mismatched shapes (``weight`` included), ``[N, L]`` advantages without
            ``token_level``, or out-of-range clip arguments.

    Shape:
        - logp, old_logp, mask: ``[N, L]``.
        - advantages: ``[N]``, or ``[N, L]`` with ``token_level=True``.
        - weight: ``[N, L]`` or None.
        - loss: ``[]``; every stats value: ``[]``.
    """
    if logp.dim() != 2 or logp.shape != old_logp.shape or logp.shape != mask.shape:
        raise ValueError(
            f"logp, old_logp and mask must all be [N, L] with the same shape, got "
            f"{tuple(logp.shape)}, {tuple(old_logp.shape)} and {tuple(mask.shape)}."
        )
    if advantages.shape == logp.shape[:1]:
        advantages = advantages.unsqueeze(-1)  # [N, 1]
    elif advantages.shape == logp.shape:
        if not token_level:
            raise ValueError(
                "per-token advantages [N, L] need token_level=True (GSPO-token): GSPO's "
                "sequence-level loss takes one advantage per response [N]."
            )
    else:
        raise ValueError(
            f"advantages must be [N] (one per response) or, with token_level=True, [N, L] = "
            f"{tuple(logp.shape)}; got {tuple(advantages.shape)}."
        )
    check_clip_settings(clip_low, clip_high, dual_clip)
    if weight is not None and weight.shape != logp.shape:
        raise ValueError(f"weight must be [N, L] = {tuple(logp.shape)}, got {tuple(weight.shape)}.")

    valid = mask.bool()  # [N, L]
    has_tokens = valid.any(dim=1)  # [N]
    log_s = sequence_log_ratio(logp, old_logp, mask).clamp(
        -_LOG_RATIO_BOUND, _LOG_RATIO_BOUND
    )  # [N]
    if token_level:
        # Value exp(log_s) at every token; the gradient reaches logp_t alone, scaled by s_i.
        log_ratio = log_s.detach().unsqueeze(-1) + (logp - logp.detach())  # [N, L]
        # Padding may hold -inf: (-inf) - (-inf) = NaN there, so zero it before exponentiating.
        log_ratio = torch.where(valid, log_ratio, torch.zeros_like(log_ratio))  # [N, L]
        ratio = torch.exp(log_ratio)  # [N, L]
    else:
        ratio = torch.exp(log_s).unsqueeze(-1)  # [N, 1]

    loss_unclipped = -advantages * ratio  # [N, 1] or [N, L]
    loss_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(loss_unclipped, loss_clipped)  # [N, 1] or [N, L]
    if dual_clip is not None:
        negative = advantages < 0
        cap = -advantages * dual_clip  # constant in logp -> no gradient past the cap
        dual_active = negative & (per_token > cap)
        per_token = torch.where(negative, torch.minimum(per_token, cap), per_token)
    else:
        dual_active = torch.zeros_like(per_token, dtype=torch.bool)
    per_token = per_token.expand_as(logp)  # [N, L]
    if weight is not None:
        per_token = per_token * weight.to(per_token.dtype)  # [N, L]

    loss = aggregate(per_token, mask, agg=agg, constant=agg_constant)

    with torch.no_grad():
        count = valid.sum().clamp(min=1)
        dtype = per_token.dtype
        clipped = (loss_clipped > loss_unclipped).expand_as(logp)  # [N, L]

        def token_mean(x: Tensor) -> Tensor:
            return torch.where(valid, x.expand_as(logp), torch.zeros_like(logp)).sum() / count

        seq_s = log_s.detach().exp()[has_tokens]  # [N']
        one = torch.ones((), dtype=dtype, device=logp.device)
        stats = {
            "clip_frac": token_mean(clipped.to(dtype)),
            "seq_clip_frac": (clipped & valid).any(dim=1)[has_tokens].to(dtype).mean()
            if bool(has_tokens.any())
            else 0 * one,
            "dual_clip_frac": token_mean(dual_active.to(dtype)),
            "ratio_mean": seq_s.mean() if seq_s.numel() else one,
            "ratio_min": seq_s.min() if seq_s.numel() else one,
            "ratio_max": seq_s.max() if seq_s.numel() else one,
            "approx_kl": token_mean((old_logp - logp).detach()),
            "loss": loss.detach(),
        }
    return loss, stats
