"""Perception objectives added to the GRPO loss: CPPO's contrastive loss and PAPO's baseline.

An objective is chosen in the config (``model.perception_loss``; null is plain GRPO). It names
the image views it needs and turns the forwards of one micro-batch under those views into a loss
term. The math is in :mod:`cppo_lightning.losses` and :mod:`cppo_lightning.detection`; this file
decides which forwards to run, on which responses, and hands the pure functions their inputs.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Iterable
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from cppo_lightning.detection import TokenSelector
from cppo_lightning.logprobs import ResponseScores, Scoring, score_responses
from cppo_lightning.losses import aggregate, contrastive_perception_loss, implicit_perception_loss
from cppo_lightning.losses.cpl import contrast_divergences
from cppo_lightning.records import RolloutBatch, pad_columns


@dataclasses.dataclass(frozen=True)
class MicroBatch:
    """One micro-batch of n responses as an objective sees it.

    Attributes:
        scores: The policy's forward under the original image (hidden states with their graph;
            log-probs and entropies are read from it chunk by chunk, see
            :mod:`cppo_lightning.logprobs`).
        logp: ``[n, L]`` log-probs of the sampled tokens under the original image (graph).
        response_ids: ``[n, L]``.
        response_mask: ``[n, L]``.
        advantages: ``[n]``.
        view_scores: ``(view, rows) -> ResponseScores`` the policy's forward of the responses
            ``rows`` (indices into this micro-batch) with the image replaced by ``view``
            (``"preserving"`` or ``"removing"``), graph attached.
        perception_mask: ``[n, L]`` tokens detected at rollout time (before gating), or None
            to detect them here from the update-time forwards.
        loss_agg: Token aggregation of the policy loss (PAPO aggregates the same way).
        agg_constant: The Dr. GRPO normaliser.
        rollout: The micro-batch's responses as a :class:`RolloutBatch` (every per-response
            field, e.g. ``old_logp``, ``removed_logp``, ``truncated``, cut to ``[n, L]``), for
            the components of :mod:`cppo_lightning.seams`.
    """

    scores: ResponseScores
    logp: Tensor
    response_ids: Tensor
    response_mask: Tensor
    advantages: Tensor
    view_scores: Callable[[str, Tensor], ResponseScores]
    perception_mask: Tensor | None = None
    loss_agg: str = "token-mean"
    agg_constant: float | None = None
    rollout: RolloutBatch | None = None


def micro_batch(
    policy: torch.nn.Module,
    rollout: RolloutBatch,
    index: Tensor,
    scores: ResponseScores,
    logp: Tensor,
    loss_agg: str,
    agg_constant: float | None,
) -> MicroBatch:
    """The :class:`MicroBatch` of responses ``index`` of ``rollout``, whose original-image
    ``scores`` and ``logp`` the policy loss has just computed."""
    views = rollout.prompts.views
    assert rollout.advantages is not None

    def view_scores(view: str, rows: Tensor) -> ResponseScores:
        if views is None:
            raise ValueError(
                "this batch carries no image views, which model.perception_loss needs: set "
                "data.preserving_view / data.removing_view (configs/base.yaml has them)."
            )
        picked = index[rows]
        return score_responses(
            policy,
            rollout.prompts,
            rollout.prompt_index[picked],
            rollout.response_ids[picked],
            rollout.response_mask[picked],
            scores.scoring,
            vision=views.vision(view),
        )

    return MicroBatch(
        scores=scores,
        logp=logp,
        response_ids=rollout.response_ids[index],
        response_mask=rollout.response_mask[index],
        advantages=rollout.advantages[index],
        view_scores=view_scores,
        perception_mask=(
            rollout.perception_mask[index] if rollout.perception_mask is not None else None
        ),
        loss_agg=loss_agg,
        agg_constant=agg_constant,
        rollout=rollout.take(index) if len(index) != rollout.num_responses else rollout,
    )


class PerceptionTerm(NamedTuple):
    """An objective's contribution to a micro-batch loss.

    Attributes:
        loss: Weighted scalar added to the policy loss.
        stats: Detached scalars to log (``perception/...``).
        mask: ``[n, L]`` tokens the term was computed on, when it selects tokens.
        entropy: ``[n, L]`` ``H`` under the original image where detection scored the tokens
            (0 in responses it did not score), for monitors; None when it scores none.
        entropy_removed: ``[n, L]`` ``H-`` under the information-removing view, likewise.
    """

    loss: Tensor
    stats: dict[str, Tensor]
    mask: Tensor | None = None
    entropy: Tensor | None = None
    entropy_removed: Tensor | None = None


class PerceptionObjective(abc.ABC):
    """An auxiliary loss on image views. ``views`` lists the ones the DataModule must draw."""

    views: tuple[str, ...] = ()
    #: Whether the objective uses the perception-token selector and the CPL weight callbacks.
    selects_tokens: bool = False

    @abc.abstractmethod
    def __call__(
        self, batch: MicroBatch, selector: TokenSelector | None, weight: float | None
    ) -> PerceptionTerm: ...


class ContrastivePerception(PerceptionObjective):
    """CPPO's Contrastive Perception Loss (docs/method.md §2-§3) on detected perception tokens.

    Detection compares each token's entropy under the original and the information-removing
    image. With advantage gating (the default) only responses with A > 0 can carry selected
    tokens, so the I- and I+ forwards run on those responses only: the loss is the same as
    running them on all, for a fraction of the cost. The token selector and lambda come from
    the ``perception_tokens`` and ``cpl_weight`` callbacks.

    Args:
        tau: Temperature of the two-candidate InfoNCE, ``softplus((D+ - D-) / tau)``.
        divergence: ``k3`` (default; clamped one-sample KL estimate), ``k1`` (log-ratio; the
            anchor cancels), or ``kl`` (exact full-vocabulary KL at the selected tokens,
            computed chunk by chunk through the LM head like the log-probs: at most
            ``logprob_chunk_tokens`` positions of each view's ``[*, V]`` distribution exist at
            once, recomputed in the backward; see :meth:`ResponseScores.kl_to`).
        stop_gradient_anchor: Detach the original-image branch inside the CPL (the policy loss
            still trains it); the recipe lets gradients flow through all three branches.
    """

    views = ("preserving", "removing")
    selects_tokens = True

    def __init__(
        self,
        tau: float = 0.1,
        divergence: Literal["k3", "k1", "kl"] = "k3",
        stop_gradient_anchor: bool = False,
    ) -> None:
        if tau <= 0:
            raise ValueError(f"model.perception_loss.tau must be > 0, got {tau}.")
        if divergence not in ("k3", "k1", "kl"):
            raise ValueError(
                f"model.perception_loss.divergence must be k3, k1 or kl, got {divergence!r}."
            )
        self.tau = tau
        self.divergence = divergence
        self.stop_gradient_anchor = stop_gradient_anchor

    def __call__(
        self, batch: MicroBatch, selector: TokenSelector | None, weight: float | None
    ) -> PerceptionTerm:
        if selector is None or weight is None:
            raise RuntimeError(
                "ContrastivePerception needs the perception_tokens and cpl_weight callbacks "
                "(the `cppo` CLI adds them from the perception_tokens: and cpl_weight: sections)."
            )
        n = batch.logp.shape[0]
        full_mask = torch.zeros_like(batch.response_mask, dtype=torch.bool)  # [n, L]
        valid = batch.response_mask.bool()  # [n, L]
        if selector.gate_advantages:
            rows = torch.nonzero(batch.advantages > 0).flatten()
        else:
            rows = torch.arange(n, device=batch.logp.device)
        stats: dict[str, Tensor] = {
            "gated_fraction": torch.tensor(rows.numel() / max(n, 1)),
            "lambda": torch.tensor(float(weight)),
        }
        zero = batch.logp.sum() * 0.0  # keeps the graph, so backward works with nothing selected
        # H and H- of the scored responses, 0 elsewhere: every micro-batch reports them, so that
        # monitors (and their all-reduces under DDP) see the same fields on every rank.
        scored_h = torch.zeros_like(batch.logp)  # [n, L]
        scored_h_neg = torch.zeros_like(batch.logp)  # [n, L]
        if rows.numel() == 0:
            stats["entropy_shift"] = stats["token_fraction"] = torch.tensor(0.0)
            empty = {**stats, **_empty_stats()}
            return PerceptionTerm(zero, empty, full_mask, scored_h, scored_h_neg)
        mask = batch.response_mask[rows]  # [m, L]
        scores = batch.scores.rows(rows)
        scores_neg = batch.view_scores("removing", rows)
        # One pass over the I- head chunks gives its log-probs (graph) and entropies (none).
        logp_neg, entropy_neg = scores_neg.logps_and_entropy()  # [m, L] each
        with torch.no_grad():
            entropy = scores.entropy()  # [m, L]
            if batch.perception_mask is not None:  # detected at rollout time
                selected = batch.perception_mask[rows].bool() & mask.bool()
            else:
                selected = selector(entropy, entropy_neg, mask, batch.advantages[rows])
            shift = (entropy_neg - entropy)[mask.bool()]
        stats["entropy_shift"] = shift.mean() if shift.numel() else torch.tensor(0.0)
        stats["token_fraction"] = selected.sum() / valid[rows].sum().clamp(min=1)
        full_mask[rows] = selected
        scored_h[rows] = entropy.to(scored_h.dtype)
        scored_h_neg[rows] = entropy_neg.to(scored_h_neg.dtype)
        if not selected.any():
            empty = {**stats, **_empty_stats()}
            return PerceptionTerm(zero, empty, full_mask, scored_h, scored_h_neg)
        scores_pos = batch.view_scores("preserving", rows)
        # L_CPL is normalised by the selected tokens of the micro-batch; rows without any
        # contribute 0 to both sums, so computing on ``rows`` only gives the same value.
        if self.divergence == "kl":
            # D+ and D- [S] straight from the hidden states, chunk by chunk through the head.
            d_pos, d_neg = scores.kl_to(
                (scores_pos, scores_neg), selected, detach_self=self.stop_gradient_anchor
            )
            cpl, cpl_stats = contrast_divergences(d_pos, d_neg, tau=self.tau)
        else:
            cpl, cpl_stats = contrastive_perception_loss(
                batch.logp[rows],
                scores_pos.logps(),
                logp_neg,
                selected.to(batch.logp.dtype),
                tau=self.tau,
                divergence=self.divergence,
                stop_gradient_anchor=self.stop_gradient_anchor,
            )
        stats.update(cpl_stats)
        return PerceptionTerm(weight * cpl, stats, full_mask, scored_h, scored_h_neg)


def _empty_stats() -> dict[str, Tensor]:
    # Every call reports the same keys: under DDP each rank logs (and all-reduces) every key.
    keys = ("cpl", "d_pos", "d_neg", "selected_tokens", "contrast_accuracy")
    return {key: torch.tensor(0.0) for key in keys}


class ImplicitPerception(PerceptionObjective):
    """PAPO's baseline (docs/method.md §5): maximise KL(pi(.|I) || pi(.|I_mask)) on all tokens of
    all rollouts, plus the double-entropy penalty on both branches.

    The masked image is the DataModule's ``removing_view`` (PAPO's patch masking in
    ``configs/experiments/papo.yaml``).

    What the PAPO authors' code does, read in ``MikeWangWZHL/PAPO`` (commit fb63bf4, their verl
    fork), and what this class does the same or differently:

    - **No gradient through the masked branch** (``detach_masked: true``, the default). In
      ``verl/workers/actor/dp_actor.py`` the module constant ``RECOMPUTE_AUG_LOG_PROBS = False``
      makes ``DataParallelPPOActor.update_policy`` read the masked log-probs (``aug_log_probs``)
      from the batch instead of recomputing them; they were computed once per rollout batch by
      ``compute_log_probs_aug`` (``verl/workers/fsdp_workers.py``), which calls the
      ``@torch.no_grad()`` ``compute_log_prob``, right after the old log-probs in
      ``RayPPOTrainer.fit`` (``verl/trainer/ray_trainer.py``). Their README ("Additional
      Implementation Notes on Entropy Losses") says so too. Here the masked forward runs under
      ``torch.no_grad()`` in every micro-batch, so neither the backbone nor the LM head gets a
      gradient from it. ``detach_masked: false`` is their ``RECOMPUTE_AUG_LOG_PROBS = True``:
      the masked log-probs are recomputed with their graph, so the KL also pushes the masked
      branch away and the masked entropy term has a gradient.
    - **Difference:** PAPO's masked log-probs come from the policy as it was at rollout time
      (stale after the first optimizer step of a rollout batch); here they come from the
      current policy at each micro-batch. The two agree on the first optimizer step of each
      rollout batch only (``configs/base.yaml`` takes two optimizer steps per rollout batch).
    - **KL estimator:** ``compute_kl(log_probs, ref_log_probs=aug_log_probs,
      kl_penalty="low_var_kl")`` in ``verl/trainer/core_algos.py``: with
      ``d = clamp(logp_masked - logp, -20, 20)``, ``clamp(exp(d) - d - 1, -10, 10)``, the
      original image as anchor; averaged with ``average_loss(..., loss_avg_mode)`` and
      subtracted times ``kl_prcp_coef``. The same here (``kl_estimator: k3``, aggregated like
      the policy loss). Their optional second clamp to ``[0, kl_prcp_clipping]``
      (``use_kl_prcp_clipping``, off by default) and top-p token mask
      (``use_kl_prcp_token_level_mask``, off) are not implemented.
    - **Double entropy:** ``entropy_loss = -masked_mean(log_probs, response_mask)`` and the same
      of ``aug_log_probs`` (``update_policy``), added with ``ori_entropy_loss_coef`` and
      ``aug_entropy_loss_coef``: "sampled" entropies, the mean negative log-prob of the sampled
      tokens. **Difference:** PAPO always takes the token mean of the micro-batch; here they
      are aggregated like the policy loss (``model.loss_agg``), the same under the default
      ``token-mean``.
    - **Coefficients:** ``gamma`` 0.02 is ``KL_PRCP_COEF`` of
      ``examples/papo_grpo/qwen2_5_vl_{3b,7b}_grpo_papo.sh`` (0.01 in their DAPO and no-KL-ref
      scripts); the entropy weights 0.03 are those of their DAPO and no-KL-ref scripts and
      ``examples/configs/config_grpo_papo.yaml`` (their 7B GRPO script uses 0.05, their 3B GRPO
      script leaves the entropy terms off).

    Args:
        gamma: Weight of the implicit perception loss ``-KL`` (PAPO: 0.01-0.02).
        entropy_coef: Weight of the entropy under the original image (PAPO-D: 0.03).
        masked_entropy_coef: Weight of the entropy under the masked image (PAPO-D: 0.03). With
            ``detach_masked`` (the default, as PAPO) this term has no gradient: it only shifts
            the loss value.
        entropy: ``sampled`` (-log-prob of the sampled token, PAPO's) or ``full``
            (full-vocabulary entropy, differentiated chunk by chunk like the log-probs).
        detach_masked: Compute the masked branch without gradient (default, PAPO's
            ``RECOMPUTE_AUG_LOG_PROBS = False``): only the original-image branch is pushed away
            from it. False lets gradients flow through the masked forward too.
        kl_estimator: Estimator of the KL: ``k3`` (clamped, as PAPO), ``k1`` or ``k2``.
    """

    views = ("removing",)

    def __init__(
        self,
        gamma: float = 0.02,
        entropy_coef: float = 0.03,
        masked_entropy_coef: float = 0.03,
        entropy: Literal["sampled", "full"] = "sampled",
        detach_masked: bool = True,
        kl_estimator: Literal["k1", "k2", "k3"] = "k3",
    ) -> None:
        if min(gamma, entropy_coef, masked_entropy_coef) < 0:
            raise ValueError(
                "model.perception_loss gamma, entropy_coef and masked_entropy_coef must be >= 0, "
                f"got {gamma}, {entropy_coef}, {masked_entropy_coef}."
            )
        if entropy not in ("sampled", "full"):
            raise ValueError(
                f"model.perception_loss.entropy must be sampled or full, got {entropy!r}."
            )
        if kl_estimator not in ("k1", "k2", "k3"):
            raise ValueError(
                f"model.perception_loss.kl_estimator must be k1, k2 or k3, got {kl_estimator!r}."
            )
        self.gamma = gamma
        self.entropy_coef = entropy_coef
        self.masked_entropy_coef = masked_entropy_coef
        self.entropy = entropy
        self.detach_masked = detach_masked
        self.kl_estimator = kl_estimator

    def _entropy(self, scores: ResponseScores, logp: Tensor, batch: MicroBatch) -> Tensor:
        if self.entropy == "sampled":
            per_token = -logp  # [n, L]
        else:
            per_token = scores.logps_and_entropy(entropy_grad=True)[1]  # [n, L]
        return aggregate(per_token, batch.response_mask, batch.loss_agg, batch.agg_constant)

    def __call__(
        self, batch: MicroBatch, selector: TokenSelector | None, weight: float | None
    ) -> PerceptionTerm:
        rows = torch.arange(batch.logp.shape[0], device=batch.logp.device)
        # Detaching the hidden states alone would still let the masked log-probs reach the LM
        # head's weights: the whole masked branch (backbone and head) runs without a graph.
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.detach_masked):
            scores_masked = batch.view_scores("removing", rows)
            logp_masked = scores_masked.logps()  # [n, L]
            masked_entropy = self._entropy(scores_masked, logp_masked, batch)
        ipl, stats = implicit_perception_loss(
            batch.logp,
            logp_masked,
            batch.response_mask,
            agg=batch.loss_agg,
            agg_constant=batch.agg_constant,
            kind=self.kl_estimator,
        )
        entropy = self._entropy(batch.scores, batch.logp, batch)
        loss = (
            self.gamma * ipl
            + self.entropy_coef * entropy
            + self.masked_entropy_coef * masked_entropy
        )
        stats = {
            **stats,
            "ipl": ipl.detach(),
            "entropy": entropy.detach(),
            "masked_entropy": masked_entropy.detach(),
        }
        return PerceptionTerm(loss, stats, None)


@torch.no_grad()
def detect_tokens(
    policy: torch.nn.Module,
    rollout: RolloutBatch,
    selector: TokenSelector,
    scoring: Scoring,
    chunks: Iterable[Tensor],
) -> Tensor:
    """``[N, L]`` perception tokens of a rollout batch under ``policy`` (rollout-time detection).

    Entropies under the original and the information-removing image are computed micro-batch
    by micro-batch (``chunks`` partition ``arange(N)``), each through the chunked LM head of
    :mod:`cppo_lightning.logprobs`, so no ``[n, L, V]`` logits exist at any time.
    """
    views = rollout.prompts.views
    if views is None:
        raise ValueError("rollout-time detection needs data.removing_view.")
    out = torch.zeros_like(rollout.response_mask, dtype=torch.bool)  # [N, L]
    for index in chunks:
        part = rollout.take(index)  # cut to the chunk's longest response: [n, l]
        ids, mask = part.response_ids, part.response_mask
        entropies = [
            score_responses(
                policy, part.prompts, part.prompt_index, ids, mask, scoring, vision
            ).entropy()  # [n, l]
            for vision in (None, views.vision("removing"))
        ]
        selected = selector(entropies[0], entropies[1], mask)  # [n, l]
        out[index] = pad_columns(selected, out.shape[1], value=False)
    return out
