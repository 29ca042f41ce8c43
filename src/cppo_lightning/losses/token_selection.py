"""Token selection for the policy-gradient term: the top fraction of tokens by a score.

Two methods of issue 31 restrict the policy gradient to a minority of response tokens: the
high-entropy "forking" tokens of "Beyond the 80/20 rule" (arXiv 2506.01939) over the *batch*, and
VPPO's most visually dependent tokens *per response* (:mod:`cppo_lightning.losses.vppo`). Both
reduce to one rule, :func:`top_fraction_mask`; :func:`top_entropy_mask` is the 80/20 method::

    H = token_entropy(logits, temperature)                    # [N, L], cppo_lightning.detection
    selected = top_entropy_mask(H, response_mask, 0.2)        # bool [N, L]

The training step applies the masks at the ``model.token_weighting`` seam
(:class:`cppo_lightning.methods.HighEntropyTokens`,
:class:`cppo_lightning.methods.DependentTokens`).
How the selected tokens enter the loss differs between the sources; the component chooses it
with its ``normalise`` (docs/methods-sources.md):

- the 80/20 authors (``Shenzhi-Wang/Beyond-the-80-20-Rule-RLVR``, ``verl/trainer/ppo/core_algos.py``
  ``compute_policy_loss_vanilla``) aggregate over ``response_mask * entropy_top_mask``, i.e. the
  token mean is over the *selected* tokens (``policy_loss(..., mask=selected)`` here);
- TRL (``GRPOTrainer._compute_loss``) multiplies the per-token loss by the mask and keeps the
  full response mask as the normaliser, so the unselected tokens still count in the denominator
  (VPPO does the same with its token mask).

Selection by count (``rule="count"``, the default, the 80/20 authors' rule): with ``n`` valid
tokens in the pool, exactly ``k = max(1, ceil(fraction * n))`` tokens are kept (``min(k, n)``),
the ``k`` highest scores; ties at the threshold are broken toward the earlier position (row-major),
so the result is deterministic. The authors use ``torch.topk`` (``get_global_entropy_top_mask``,
``k = max(1, int(n * top_ratio + 0.9999))``), whose tie order is unspecified, and
``ceil`` differs from their ``+ 0.9999`` only when ``fraction * n`` is within 1e-4 above an
integer.

Selection by quantile (``rule="quantile"``, TRL's ``get_high_entropy_mask``): the threshold is the
``1 - fraction`` quantile of the pool's valid scores with linear interpolation (what
``torch.quantile`` computes), and every valid token with a score ``>=`` it is kept, ties included,
so the count can exceed ``fraction * n``. Computed here from a sort, so it has no
``torch.quantile`` input-size limit.

The pool: the whole batch passed in (``per_response=False``; the 80/20 rule; in both codes the
"batch" is the micro-batch, gathered across ranks in TRL) or each response separately
(``per_response=True``; VPPO's rule, and CPPO's "entropy selection" ablation).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "SELECTION_RULES",
    "selection_stats",
    "selection_threshold",
    "top_entropy_mask",
    "top_fraction_mask",
]

SELECTION_RULES = ("count", "quantile")

# ceil(fraction * n) is taken with this much slack so that products that are integers in exact
# arithmetic but land just above one in binary floating point still give that integer.
_CEIL_SLACK = 1e-9


def _check(scores: Tensor, mask: Tensor, fraction: float, rule: str, name: str) -> None:
    if scores.dim() != 2 or scores.shape != mask.shape:
        raise ValueError(
            f"scores and mask must both be [N, L] with the same shape, got "
            f"{tuple(scores.shape)} and {tuple(mask.shape)}."
        )
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise ValueError(f"{name} must be a number in [0, 1], got {fraction!r}.")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(
            f"{name} must be in [0, 1] (the fraction of tokens kept; 0 keeps the single "
            f"highest), got {fraction!r}."
        )
    if rule not in SELECTION_RULES:
        raise ValueError(f"rule must be one of {SELECTION_RULES}, got {rule!r}.")


def _by_count(ranked: Tensor, valid: Tensor, fraction: float) -> Tensor:
    """Exactly ``max(1, ceil(fraction * n))`` highest per row (capped at n), ties by position."""
    count = valid.sum(dim=1)  # [R]
    k = torch.ceil(count.double() * fraction - _CEIL_SLACK).long().clamp(min=1)  # [R]
    k = torch.minimum(k, count)  # [R]; 0 where a row has no valid token
    order = torch.sort(ranked, dim=1, descending=True, stable=True).indices  # [R, C]
    positions = torch.arange(ranked.shape[1], device=ranked.device).expand_as(order)  # [R, C]
    rank = torch.empty_like(order).scatter_(1, order, positions)  # [R, C]; 0 = highest
    return valid & (rank < k.unsqueeze(1))  # [R, C]


def _by_quantile(scores: Tensor, valid: Tensor, fraction: float) -> Tensor:
    """Valid entries ``>=`` the row's ``1 - fraction`` quantile (linear interpolation)."""
    count = valid.sum(dim=1)  # [R]
    # Invalid entries sort last (ascending), so the first count[r] entries are the valid ones.
    filled = torch.where(valid, scores, torch.full_like(scores, math.inf))  # [R, C]
    ordered = filled.sort(dim=1).values  # [R, C]
    position = (1.0 - fraction) * (count - 1).clamp(min=0).double()  # [R]
    low = position.floor().long()  # [R]
    high = torch.minimum(low + 1, (count - 1).clamp(min=0))  # [R]
    value_low = ordered.gather(1, low.unsqueeze(1)).double()  # [R, 1]
    value_high = ordered.gather(1, high.unsqueeze(1)).double()  # [R, 1]
    weight = (position - low.double()).unsqueeze(1)  # [R, 1]
    # Written as low + w * (high - low), the form torch.quantile uses; w = 0 avoids inf * 0.
    threshold = torch.where(
        weight > 0, value_low + weight * (value_high - value_low), value_low
    )  # [R, 1]
    return valid & (scores.double() >= threshold) & (count > 0).unsqueeze(1)  # [R, C]


def top_fraction_mask(
    scores: Tensor,
    mask: Tensor,
    fraction: float,
    *,
    per_response: bool = False,
    rule: str = "count",
) -> Tensor:
    """Select the top ``fraction`` of the valid tokens by ``scores``, over the batch or per row.

    See the module docstring for the two rules. Padding (``mask == 0``) is never selected,
    whatever its score; a pool without valid tokens selects nothing; a non-empty pool selects at
    least one token (its highest). A NaN score is treated like padding: never selected and not
    counted in ``n``. Computed without gradient.

    Args:
        scores: Per-token scores, higher = more wanted (entropy, visual dependency).
        mask: Response mask; non-zero (or True) marks a valid token.
        fraction: The fraction of each pool's valid tokens to keep, in [0, 1].
        per_response: One pool per response (row) instead of one for the whole batch.
        rule: ``"count"`` (default; exact count, deterministic ties) or ``"quantile"``.

    Returns:
        A bool tensor, True at the selected tokens; it does not require grad.

    Raises:
        ValueError: On mismatched shapes, ``fraction`` outside [0, 1] or an unknown ``rule``.

    Shape:
        - scores, mask: ``[N, L]``.
        - output: ``[N, L]``, dtype bool.
    """
    _check(scores, mask, fraction, rule, "fraction")
    with torch.no_grad():
        values = scores.detach()  # [N, L]
        valid = mask.detach().bool() & ~torch.isnan(values)  # [N, L]
        pool_values = values if per_response else values.reshape(1, -1)  # [R, C]
        pool_valid = valid if per_response else valid.reshape(1, -1)  # [R, C]
        if rule == "count":
            ranked = torch.where(
                pool_valid, pool_values, torch.full_like(pool_values, -math.inf)
            )  # [R, C]
            selected = _by_count(ranked, pool_valid, float(fraction))  # [R, C]
        else:
            selected = _by_quantile(pool_values, pool_valid, float(fraction))  # [R, C]
        return selected.reshape(scores.shape)  # [N, L]


def top_entropy_mask(
    entropy: Tensor,
    mask: Tensor,
    quantile: float = 0.2,
    *,
    rule: str = "count",
    per_response: bool = False,
) -> Tensor:
    """The top-``quantile`` highest-entropy response tokens of the batch ("the 80/20 rule").

    ``quantile`` is rho, the fraction of tokens *kept* (TRL's ``top_entropy_quantile``; the
    authors' ``entropy_top_ratio``), not a quantile level: 0.2 keeps the 20% highest-entropy
    tokens. Defaults and sources:

    - rho = 0.2: the paper's main setting ("only 20% of the tokens"); the authors' script
      ``recipe/rlvr_with_high_entropy_tokens_only/run_only_top20_high_entropy_tokens_dapo_qwen3_14b.sh``
      (``actor.entropy_top_ratio=0.2``); TRL's docstring ("The paper recommends a value of 0.2";
      TRL's own default is 1.0, i.e. off).
    - the pool is the batch (``per_response=False``): the authors' ``get_global_entropy_top_mask``
      flattens the micro-batch; TRL gathers the micro-batch's valid entropies across ranks.
    - ``rule="count"`` is the authors' top-k; ``rule="quantile"`` is TRL's ``>= torch.quantile``.
    - the entropy is the full-vocabulary entropy of the temperature-scaled next-token
      distribution (paper Eq. for ``H_t``; :func:`cppo_lightning.detection.token_entropy`).
    - the paper's base recipe is DAPO (clip 0.2/0.28, no KL, dynamic sampling on accuracy,
      overlong buffer 4096 of 20480, ``clip_ratio_c=10``, token-mean); see
      :mod:`cppo_lightning.losses.dapo`.

    Args:
        entropy: Per-token entropy of the policy's next-token distribution.
        mask: Response mask; non-zero (or True) marks a valid token.
        quantile: rho in [0, 1]; 0 keeps the single highest-entropy token, 1 keeps all.
        rule: ``"count"`` (default) or ``"quantile"``; see :func:`top_fraction_mask`.
        per_response: Select per response instead of over the batch.

    Returns:
        A bool tensor, True at the selected tokens; never True on padding.

    Raises:
        ValueError: On mismatched shapes, ``quantile`` outside [0, 1] or an unknown ``rule``.

    Shape:
        - entropy, mask: ``[N, L]``.
        - output: ``[N, L]``, dtype bool.
    """
    _check(entropy, mask, quantile, rule, "quantile")
    return top_fraction_mask(entropy, mask, quantile, per_response=per_response, rule=rule)


def selection_stats(scores: Tensor, mask: Tensor, selected: Tensor) -> dict[str, Tensor]:
    """Detached statistics of a token selection, the ones its users watch.

    The 80/20 and VPPO authors log the kept fraction and the mean score of the kept and of the
    rejected tokens (VPPO's ``actor/perception_token_fraction``,
    ``actor/low_var_kl_mean_selected`` / ``_rejected``; ``actor/entropy_token_fraction``,
    ``actor/entropy_mean_selected`` / ``_rejected``).

    Returns:
        ``{"fraction": selected / valid tokens (0 if none), "selected_mean": mean score of the
        selected tokens, "rejected_mean": of the valid unselected ones}``; a mean over no tokens
        is NaN (nothing to report, as the authors skip the metric there).

    Shape:
        - scores, mask, selected: ``[N, L]``.
        - every value: ``[]``.
    """
    if not scores.shape == mask.shape == selected.shape or scores.dim() != 2:
        raise ValueError(
            f"scores, mask and selected must all be [N, L] with the same shape, got "
            f"{tuple(scores.shape)}, {tuple(mask.shape)} and {tuple(selected.shape)}."
        )
    with torch.no_grad():
        values = scores.detach()
        dtype = values.dtype if values.is_floating_point() else torch.get_default_dtype()
        values = values.to(dtype)
        valid = mask.detach().bool()  # [N, L]
        kept = selected.detach().bool() & valid  # [N, L]
        rejected = valid & ~kept  # [N, L]
        zero = torch.zeros_like(values)

        def mean(where: Tensor) -> Tensor:
            count = where.sum()
            total = torch.where(where, values, zero).sum()
            return total / count if bool(count > 0) else torch.full_like(total, float("nan"))

        n_valid = valid.sum()
        fraction = kept.sum().to(dtype) / n_valid.clamp(min=1).to(dtype)
        return {
            "fraction": fraction,
            "selected_mean": mean(kept),
            "rejected_mean": mean(rejected),
        }


def selection_threshold(
    scores: Tensor, mask: Tensor, selected: Tensor, *, per_response: bool = False
) -> Tensor:
    """The score a token needed to be selected: the lowest selected score of the pool.

    Over the batch (``per_response=False``) the lowest score among the selected valid tokens
    (the k-th highest of the count rule). Per response, the mean over the responses with a
    selected token of each one's lowest selected score, as VPPO's authors log
    ``actor/low_var_kl_threshold`` (the mean of each response's k-th largest dependency,
    ``dp_actor.update_policy``). NaN when nothing is selected (nothing to report).

    Shape:
        - scores, mask, selected: ``[N, L]``.
        - output: ``[]``.
    """
    if not scores.shape == mask.shape == selected.shape or scores.dim() != 2:
        raise ValueError(
            f"scores, mask and selected must all be [N, L] with the same shape, got "
            f"{tuple(scores.shape)}, {tuple(mask.shape)} and {tuple(selected.shape)}."
        )
    with torch.no_grad():
        values = scores.detach()
        dtype = values.dtype if values.is_floating_point() else torch.get_default_dtype()
        values = values.to(dtype)
        kept = selected.detach().bool() & mask.detach().bool()  # [N, L]
        lowest = torch.where(kept, values, torch.full_like(values, math.inf))  # [N, L]
        if not per_response:
            lowest = lowest.reshape(1, -1)  # [1, N * L]
            kept = kept.reshape(1, -1)
        rows = kept.any(dim=1)  # [R]
        if not bool(rows.any()):
            return torch.full((), math.nan, dtype=dtype, device=values.device)
        return lowest.min(dim=1).values[rows].mean()
