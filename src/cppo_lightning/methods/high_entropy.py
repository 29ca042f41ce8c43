"""High-entropy tokens ("Beyond the 80/20 rule", arXiv 2506.01939), at ``model.token_weighting``.

The policy gradient is kept only on the top-rho highest-entropy tokens of each micro-batch (the
"forking" tokens); every other token contributes nothing. The math is
:func:`cppo_lightning.losses.token_selection.top_entropy_mask`; the overlay
``configs/experiments/high-entropy.yaml`` turns the method on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from torch import Tensor

from cppo_lightning.losses.token_selection import (
    SELECTION_RULES,
    selection_stats,
    selection_threshold,
    top_entropy_mask,
)
from cppo_lightning.seams import TokenWeighting

if TYPE_CHECKING:
    from cppo_lightning.perception import MicroBatch


class HighEntropyTokens(TokenWeighting):
    """The policy gradient on the ``rho`` highest-entropy valid tokens of the micro-batch only.

    The entropy is the full-vocabulary entropy of the temperature-scaled next-token distribution
    of the current policy, read from the update forward without a graph
    (``batch.scores.entropy()``): a weight, not a loss.

    Defaults and where they come from (docs/methods-sources.md, "High-entropy tokens"):

    - ``rho = 0.2``: the paper's main setting; the authors' script
      ``recipe/rlvr_with_high_entropy_tokens_only/run_only_top20_high_entropy_tokens_dapo_qwen3_14b.sh``
      (``actor.entropy_top_ratio=0.2``); TRL's docstring ("The paper recommends a value of 0.2").
    - ``rule = "count"``: exactly ``ceil(rho * n)`` tokens, the authors' ``torch.topk`` in
      ``get_global_entropy_top_mask``; ``"quantile"`` is TRL's ``>= torch.quantile`` (ties kept).
    - ``per_response = False``: one pool, the micro-batch's valid tokens, as the authors'
      ``get_global_entropy_top_mask`` (TRL also gathers across ranks); True selects per response
      (VPPO's ``use_vppo_on_entropy``).
    - ``normalise = "selected"``: the token mean runs over the selected tokens only, as the
      authors' ``compute_policy_loss_vanilla`` (``agg_loss(..., response_mask *
      entropy_top_mask)``); ``"all"`` divides by every valid token, as TRL's
      ``top_entropy_quantile``.

    Where this differs from the authors' code: the pool is this step's micro-batch on this
    rank; with ``model.micro_batch_size`` at least the mini-batch's responses (the default
    config) that is the mini-batch, which the authors' recipe splits further. Ties at the
    threshold go to the earlier token (``topk``'s order is unspecified). Under DDP the pool is
    not gathered across ranks (TRL gathers it; the authors do not). With several micro-batches
    per mini-batch the step weighs each one's loss by its share of the valid tokens, not of the
    selected ones (the authors: by its share of the responses). The authors' base recipe is
    DAPO; the overlay keeps the project's GRPO base (see its header).

    Logs (as ``train/tokens/<key>``): ``fraction`` (selected / valid tokens), ``threshold``
    (the lowest selected entropy), ``selected_mean`` and ``rejected_mean`` (mean entropy of the
    selected and of the other valid tokens; NaN when there are none, e.g. ``rho = 1``) and
    ``entropy_mean`` (every valid token: the policy entropy the paper tracks).

    Args:
        rho: The fraction of the pool's valid tokens kept, in [0, 1] (0 keeps the single
            highest).
        rule: ``"count"`` or ``"quantile"``.
        per_response: One pool per response instead of the micro-batch.
        normalise: ``"selected"`` or ``"all"`` (see :class:`~cppo_lightning.seams.TokenWeighting`).
    """

    reads_entropy: ClassVar[bool] = True

    def __init__(
        self,
        rho: float = 0.2,
        rule: Literal["count", "quantile"] = "count",
        per_response: bool = False,
        normalise: Literal["selected", "all"] = "selected",
    ) -> None:
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0.0 <= rho <= 1.0:
            raise ValueError(
                f"model.token_weighting.rho must be in [0, 1] (the fraction of tokens kept; the "
                f"paper uses 0.2), got {rho!r}."
            )
        if rule not in SELECTION_RULES:
            raise ValueError(
                f"model.token_weighting.rule must be one of {SELECTION_RULES}, got {rule!r}."
            )
        if normalise not in ("selected", "all"):
            raise ValueError(
                f"model.token_weighting.normalise must be 'selected' (the authors) or 'all' "
                f"(TRL), got {normalise!r}."
            )
        self.rho, self.rule, self.per_response = float(rho), rule, per_response
        self.normalise = normalise

    def __call__(self, batch: MicroBatch) -> tuple[Tensor, dict[str, Tensor]]:
        entropy = batch.scores.entropy()  # [n, L], no graph
        mask = batch.response_mask  # [n, L]
        selected = top_entropy_mask(
            entropy, mask, self.rho, rule=self.rule, per_response=self.per_response
        )  # bool [n, L]
        stats = selection_stats(entropy, mask, selected)
        stats["threshold"] = selection_threshold(
            entropy, mask, selected, per_response=self.per_response
        )
        valid = mask.bool()
        stats["entropy_mean"] = entropy[valid].sum() / valid.sum().clamp(min=1)
        return selected, stats
