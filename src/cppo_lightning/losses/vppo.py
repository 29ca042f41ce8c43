"""VPPO's token visual dependency, token mask and advantage shaping (arXiv 2510.09285).

VPPO ("Spotlight on Token Perception", Huang et al.) scores each response token by how much the
policy's prediction of it changes when the image is patch-masked, then (a) keeps the policy
gradient only on the most dependent tokens of each response ("token gradient filtering") and
(b) scales each response's advantage by its mean dependency ("trajectory advantage shaping")::

    dep = visual_dependency(old_logp, masked_logp)                 # [N, L], no grad
    selected = vppo_token_mask(dep, response_mask, top_fraction=0.4)  # bool [N, L]
    score = trajectory_dependency(dep, response_mask)              # [N]
    scale, stats = vppo_advantage_scale(score, scale_min=0.9, bounds=(low, high))
    advantages = advantages * scale                                # [N]

The training step reaches these through :mod:`cppo_lightning.methods.vppo`
(``configs/experiments/vppo.yaml``): a patch-masked view per prompt, one extra no-grad forward per
rollout batch (``removed_logp``, the ``masked_logp`` here), the ``model.advantage`` seam for the
scale and the ``model.token_weighting`` seam for the mask (docs/methods-sources.md).

Everything below is read from the authors' code, ``huaixuheqing/VPPO-RL`` (an EasyR1 fork; HEAD
a23c54b, 2026-04-03): ``verl/workers/actor/dp_actor.py`` ``DataParallelPPOActor.update_policy``,
``verl/workers/perc_utils.py``, ``verl/trainer/config.py`` and
``examples/configs/train_vppo_7b.sh`` / ``train_vppo_8b.sh``. The paper's own equations were not
available to us beyond its abstract (which says only that trajectories are reweighted "by
overall visual dependency" and updates focus on "perceptually pivotal tokens"); where the paper
states other values, the code wins here, as for every method of docs/method.md §8.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cppo_lightning.losses.token_selection import top_fraction_mask

__all__ = [
    "trajectory_dependency",
    "visual_dependency",
    "vppo_advantage_scale",
    "vppo_token_mask",
]

# The authors' clamps on the log-ratio and on the k3 value (update_policy).
_LOG_RATIO_BOUND = 20.0
_K3_MAX = 10.0
# Their guards: below this min-max range, or with fewer than two scored responses, every scale is 1.
_MIN_RANGE = 1e-6


def visual_dependency(logp: Tensor, logp_masked: Tensor) -> Tensor:
    """Per-token visual dependency: the k3 estimate of KL(pi(.|I) || pi(.|I_masked)).

    ``d = clamp(logp_masked - logp, -20, 20)``, ``S = clamp(exp(d) - d - 1, 0, 10)``: a one-sample
    (sampled-token) estimate, *not* the full-vocabulary KL, exactly as the authors compute their
    ``low_var_kl`` in ``update_policy`` from ``aug_log_probs - old_log_probs``. There ``logp`` is
    the rollout-time policy's log-prob given the original image (``old_log_probs``, no grad) and
    ``logp_masked`` the same policy's given the masked image (``aug_log_probs``, computed once per
    rollout batch by ``compute_aug_log_probs``). Their masked image is
    ``perc_utils.random_patch_blackening``: 14-px patches blacked out with probability 0.5 (PAPO's
    :func:`cppo_lightning.perturbations.patch_masking` uses 0.6), applied to the resized image
    before the processor. For the exact full-vocabulary KL use
    :func:`cppo_lightning.losses.cpl.full_kl` on the two ``log_softmax`` outputs instead.

    Same estimator as :func:`cppo_lightning.losses.kl_estimate` with ``kind="k3"`` and
    ``ref_logp=logp_masked``, except for the lower clamp at 0 (the authors'; k3 is non-negative in
    exact arithmetic). Computed without gradient: the dependency is a weight, not a loss.

    Args:
        logp: Log-probs of the sampled tokens given the original image.
        logp_masked: The same given the patch-masked image.

    Returns:
        The dependency at each position, detached; padding positions hold whatever their inputs
        give (finite, thanks to the clamps) and must be masked by the caller.

    Raises:
        ValueError: If the shapes differ.

    Shape:
        - logp, logp_masked: ``[N, L]``.
        - output: ``[N, L]``.
    """
    if logp.shape != logp_masked.shape:
        raise ValueError(
            f"logp and logp_masked must have the same shape, got {tuple(logp.shape)} and "
            f"{tuple(logp_masked.shape)}; score the same padded responses under both images."
        )
    with torch.no_grad():
        d = (logp_masked.detach() - logp.detach()).nan_to_num(nan=0.0)  # [N, L]; -inf - -inf
        d = d.clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)  # [N, L]
        return (torch.exp(d) - d - 1.0).clamp(0.0, _K3_MAX)  # [N, L]


def vppo_token_mask(dependency: Tensor, mask: Tensor, top_fraction: float = 0.4) -> Tensor:
    """VPPO's token gradient filter: the top ``top_fraction`` most dependent tokens per response.

    Per response with ``n`` valid tokens, exactly ``k = ceil(top_fraction * n)`` tokens with the
    highest dependency are kept (:func:`cppo_lightning.losses.token_selection.top_fraction_mask`
    with ``per_response=True``), ties broken toward the earlier token; the authors sort with
    ``torch.sort`` (unspecified tie order). Padding is never kept.

    Defaults: ``top_fraction = 0.4`` is ``top_p_perception_tokens`` in both released training
    scripts (``train_vppo_7b.sh``, ``train_vppo_8b.sh``); the config class default is 0.2
    (``AlgorithmConfig.top_p_perception_tokens``). How the mask enters the loss, in the authors'
    ``compute_policy_loss``: the per-token loss is multiplied by it and the token mean still
    divides by *all* valid tokens (``average_loss(final_pg_loss, response_mask)``), so a response
    contributes 0 at its unselected tokens rather than being renormalised over the selected ones.

    Args:
        dependency: Per-token visual dependency (:func:`visual_dependency`).
        mask: Response mask; non-zero (or True) marks a valid token.
        top_fraction: The fraction of each response's valid tokens kept, in (0, 1].

    Returns:
        A bool tensor, True at the selected tokens.

    Raises:
        ValueError: On mismatched shapes or ``top_fraction`` outside (0, 1].

    Shape:
        - dependency, mask: ``[N, L]``.
        - output: ``[N, L]``, dtype bool.
    """
    if isinstance(top_fraction, bool) or not (
        isinstance(top_fraction, (int, float)) and 0.0 < top_fraction <= 1.0
    ):
        raise ValueError(
            f"top_fraction must be in (0, 1] (the authors' scripts use 0.4), got {top_fraction!r}."
        )
    return top_fraction_mask(dependency, mask, top_fraction, per_response=True, rule="count")


def trajectory_dependency(dependency: Tensor, mask: Tensor) -> Tensor:
    """Mean visual dependency over each response's valid tokens (the authors' "sensitivity score").

    ``sum_t(S * m) / max(sum_t m, 1)``: 0 for a response without valid tokens, as in
    ``update_policy``. Masked-out positions are replaced by 0 before summing.

    Shape:
        - dependency, mask: ``[N, L]``.
        - output: ``[N]``.
    """
    if dependency.dim() != 2 or dependency.shape != mask.shape:
        raise ValueError(
            f"dependency and mask must both be [N, L] with the same shape, got "
            f"{tuple(dependency.shape)} and {tuple(mask.shape)}."
        )
    valid = mask.bool()  # [N, L]
    total = torch.where(valid, dependency, torch.zeros_like(dependency)).sum(dim=1)  # [N]
    return total / valid.sum(dim=1).clamp(min=1)  # [N]


def vppo_advantage_scale(
    scores: Tensor,
    *,
    scale_min: float = 0.9,
    valid: Tensor | None = None,
    bounds: tuple[float, float] | tuple[Tensor, Tensor] | None = None,
    eps: float = 1e-8,
) -> tuple[Tensor, dict[str, Tensor]]:
    """VPPO's trajectory advantage shaping: one multiplicative scale per response.

    With ``(low, high)`` the min and max score of the *mini-batch* (``bounds``) and the rows
    passed here being one *micro-batch*, as in the authors' ``update_policy``::

        u_i     = clamp((s_i - low) / (high - low), 0, 1)             # valid rows
        mu      = mean_i(u_i)                                         # over the valid rows passed
        top     = scale_min + (1 - scale_min) / (mu + eps)
        scale_i = scale_min + u_i * (top - scale_min)                 # valid rows; 1 elsewhere

    so the scales of the valid rows lie in ``[scale_min, top]`` and average to 1 (up to ``eps``):
    the least dependent response of the mini-batch is scaled by ``scale_min``, and the advantage
    mass moves toward the more dependent ones. Every scale is 1 when ``high - low <= 1e-6`` or,
    without ``bounds``, when fewer than two rows are valid (the authors' guards). If every valid
    row sits at ``low`` (``mu = 0``), every scale is ``scale_min``, as in their code.

    Defaults: ``scale_min = 0.9`` is ``advantage_scaling_min`` in both released scripts; the config
    class default is 0.8. The authors take ``low``/``high`` as ``torch.quantile(scores, 0.0)`` and
    ``(..., 1.0)`` of the mini-batch on each rank (their cross-rank all-reduce is commented out),
    and ``mu`` per micro-batch: pass ``bounds`` from the mini-batch to match; without it the rows
    passed are their own mini-batch.

    Args:
        scores: Per-response mean dependency (:func:`trajectory_dependency`).
        scale_min: The scale of the least dependent response, in [0, 1].
        valid: Which rows have tokens (the authors' ``num_valid_tokens > 0``); all when None.
            Invalid rows get scale 1 and do not count in ``mu``.
        bounds: ``(low, high)``, the score range to normalise by; the valid rows' min and max
            when None.
        eps: Added to ``mu`` before dividing (the authors' 1e-8).

    Returns:
        ``(scale, stats)``: the scale of each response (detached) and detached scalars
        ``"scale_max"`` (``top``, 1 when shaping is off), ``"scale_mean"`` (over all rows),
        ``"score_mean"`` (over valid rows), ``"score_low"`` and ``"score_high"``.

    Raises:
        ValueError: If ``scores`` is not 1-D, ``valid`` has another shape, or ``scale_min`` is
            outside [0, 1].

    Shape:
        - scores, valid: ``[N]``.
        - scale: ``[N]``; every stats value: ``[]``.
    """
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D [N], got shape {tuple(scores.shape)}.")
    if valid is not None and valid.shape != scores.shape:
        raise ValueError(
            f"valid must be [N] like scores {tuple(scores.shape)}, got {tuple(valid.shape)}."
        )
    if isinstance(scale_min, bool) or not (
        isinstance(scale_min, (int, float)) and 0.0 <= scale_min <= 1.0
    ):
        raise ValueError(
            f"scale_min must be in [0, 1] (the authors' scripts use 0.9), got {scale_min!r}."
        )

    with torch.no_grad():
        s = scores.detach()
        dtype = s.dtype if s.is_floating_point() else torch.get_default_dtype()
        s = s.to(dtype)  # [N]
        rows = torch.ones_like(s, dtype=torch.bool) if valid is None else valid.bool()  # [N]
        scored = s[rows]  # [N']
        scale = torch.ones_like(s)  # [N]
        nan = torch.full((), float("nan"), dtype=dtype, device=s.device)
        if bounds is None:
            low = scored.min() if scored.numel() > 1 else nan
            high = scored.max() if scored.numel() > 1 else nan
        else:
            low = torch.as_tensor(bounds[0], dtype=dtype, device=s.device)
            high = torch.as_tensor(bounds[1], dtype=dtype, device=s.device)
        top = torch.ones((), dtype=dtype, device=s.device)
        shaping = bool(torch.isfinite(high - low)) and bool(high - low > _MIN_RANGE)
        if shaping and scored.numel() > 0:
            u = ((scored - low) / (high - low)).clamp(0.0, 1.0)  # [N']
            mu = u.mean()
            top = scale_min + (1.0 - scale_min) / (mu + eps)
            scale[rows] = scale_min + u * (top - scale_min)  # [N']
        stats = {
            "scale_max": top,
            "scale_mean": scale.mean(),
            "score_mean": scored.mean() if scored.numel() else nan,
            "score_low": low,
            "score_high": high,
        }
    return scale, stats
