"""Rankings of the perception-token selection other than the entropy shift: CPPO's ablations.

CPPO's contrastive loss acts on the tokens whose entropy rises most when the task-relevant image
content is removed (:func:`cppo_lightning.detection.perception_token_mask`). To judge that
choice, the same loss can act on the same *number* of tokens per response picked another way:

- ``"entropy"``: the tokens of highest entropy ``H`` under the original image, i.e. the tokens
  the policy is least sure of, without looking at any other view
  (:func:`highest_entropy_mask`);
- ``"random"``: uniformly random response tokens (:func:`random_token_mask`).

Both take the per-response budget as an argument (``budget[r]`` tokens of response r); the
detection module computes it as the number of tokens the entropy-shift rule selects in that
response, so that only the ranking differs between CPPO and its ablations::

    shift = perception_token_mask(H, H_neg, response_mask)            # bool [N, L]
    budget = shift.sum(dim=1)                                         # [N]
    by_entropy = highest_entropy_mask(H, response_mask, budget)       # bool [N, L]
    by_chance = random_token_mask(response_mask, budget)              # bool [N, L]

``perception_token_mask(..., ranking="entropy")`` and ``ranking="random"`` compose exactly this.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["RANKINGS", "check_ranking", "highest_entropy_mask", "random_token_mask"]

#: How the selection ranks a response's tokens: by entropy shift (the paper), by entropy under
#: the original image, or not at all (uniformly at random).
RANKINGS = ("entropy-shift", "entropy", "random")

# Random keys are drawn in [0, 2**62): two valid tokens of one response share a key with
# probability about L**2 / 2**63, so the uniform choice is not biased by tie-breaking.
_KEY_RANGE = 2**62


def check_ranking(ranking: str) -> None:
    """Raises ``ValueError`` naming the valid rankings unless ``ranking`` is one of them."""
    if ranking not in RANKINGS:
        raise ValueError(
            f"ranking must be one of {RANKINGS} ('entropy-shift' = H(I-) - H(I), the paper; "
            f"'entropy' = H(I), the highest-entropy tokens; 'random' = as many tokens chosen "
            f"uniformly at random), got {ranking!r}."
        )


def _check_budget(budget: Tensor, mask: Tensor) -> None:
    if mask.dim() != 2:
        raise ValueError(f"mask must be [N, L] (responses, tokens), got shape {tuple(mask.shape)}.")
    if budget.shape != mask.shape[:1]:
        raise ValueError(
            f"budget must be [N] (one token count per response) with [N, L] = "
            f"{tuple(mask.shape)}, got {tuple(budget.shape)}."
        )
    if budget.is_floating_point() or budget.is_complex() or budget.dtype == torch.bool:
        raise ValueError(
            f"budget must hold integer token counts, got dtype {budget.dtype}; pass e.g. "
            "selected.sum(dim=1)."
        )
    if bool((budget < 0).any()):
        raise ValueError(f"budget must be >= 0 in every response, got {budget.tolist()}.")


def highest_entropy_mask(entropy: Tensor, mask: Tensor, budget: Tensor) -> Tensor:
    """Per response, the ``budget[r]`` valid tokens of highest entropy under the original image.

    The rule mirrors the entropy-shift selection's: in row r, the valid tokens (``mask != 0``,
    entropy not NaN; call their count ``n``) whose ``H`` is at least the ``k``-th largest valid
    ``H`` are kept, with ``k = min(budget[r], n)``. Ties at that threshold are all kept, so a row
    may keep more than ``k`` tokens (as :func:`~cppo_lightning.detection.perception_token_mask`
    keeps ties). A row with ``k = 0`` keeps nothing; padding and prompt positions are never
    kept, however high their entropy. Vectorised (one sort per row); computed without gradient.

    Args:
        entropy: ``H``, the entropy of the next-token distribution given the original image.
        mask: Response mask; non-zero (or True) marks a real response token.
        budget: Tokens to keep per response (integers >= 0), e.g. how many the entropy-shift
            rule selected in it.

    Returns:
        A bool tensor, True at the selected tokens; it does not require grad.

    Raises:
        ValueError: If the shapes do not match or ``budget`` is not a count >= 0 per row.

    Shape:
        - entropy, mask: ``[N, L]``.
        - budget: ``[N]``.
        - output: ``[N, L]``, dtype bool.
    """
    if entropy.shape != mask.shape:
        raise ValueError(
            f"entropy and mask must both be [N, L] with the same shape, got "
            f"{tuple(entropy.shape)} and {tuple(mask.shape)}."
        )
    _check_budget(budget, mask)
    with torch.no_grad():
        values = entropy.detach()  # [N, L]
        valid = mask.detach().bool() & ~torch.isnan(values)  # [N, L]
        k = torch.minimum(budget.to(valid.device).long(), valid.sum(dim=1))  # [N]
        ranked = torch.where(valid, values, torch.full_like(values, -math.inf))  # [N, L]
        ordered = ranked.sort(dim=1, descending=True).values  # [N, L]
        threshold = ordered.gather(1, (k - 1).clamp(min=0).unsqueeze(1))  # [N, 1]
        return valid & (ranked >= threshold) & (k > 0).unsqueeze(1)  # [N, L]


def random_token_mask(
    mask: Tensor, budget: Tensor, *, generator: torch.Generator | None = None
) -> Tensor:
    """Per response, exactly ``min(budget[r], n)`` of its ``n`` valid tokens, uniformly at random.

    Every subset of that size of the row's valid tokens (``mask != 0``) is equally likely; rows
    are drawn independently; padding and prompt positions are never kept. One random int64 key
    is drawn per position (valid or not, so the draw's size depends only on the shape), and each
    row keeps its valid tokens of the ``budget[r]`` largest keys.

    The keys come from ``generator``, or when it is None from torch's global generator of the
    mask's device (the CPU one, or the current CUDA device's). The global generators are
    deterministic under ``seed_everything`` and saved in every ``cppo fit`` checkpoint and
    restored on resume (:mod:`cppo_lightning.checkpoints`), so a run that selects at random
    repeats itself and resumes bit for bit. A given ``generator`` draws on its own device; the
    keys are then moved to the mask's.

    Args:
        mask: Response mask; non-zero (or True) marks a real response token.
        budget: Tokens to keep per response (integers >= 0).
        generator: The random generator to draw from; None uses torch's global one.

    Returns:
        A bool tensor, True at the selected tokens, with ``min(budget[r], n_r)`` True in row r.

    Raises:
        ValueError: If ``mask`` is not 2-D or ``budget`` is not a count >= 0 per row.

    Shape:
        - mask: ``[N, L]``.
        - budget: ``[N]``.
        - output: ``[N, L]``, dtype bool.
    """
    _check_budget(budget, mask)
    with torch.no_grad():
        valid = mask.detach().bool()  # [N, L]
        device = generator.device if generator is not None else valid.device
        keys = torch.randint(
            0, _KEY_RANGE, valid.shape, generator=generator, device=device, dtype=torch.int64
        ).to(valid.device)  # [N, L]
        ranked = torch.where(valid, keys, torch.full_like(keys, -1))  # [N, L]; invalid last
        order = ranked.sort(dim=1, descending=True, stable=True).indices  # [N, L]
        positions = torch.arange(valid.shape[1], device=valid.device).expand_as(order)  # [N, L]
        rank = torch.empty_like(order).scatter_(1, order, positions)  # [N, L]; 0 = largest key
        return valid & (rank < budget.to(valid.device).long().unsqueeze(1))  # [N, L]
