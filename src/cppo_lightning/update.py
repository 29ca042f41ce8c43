"""One training step: the loss path of :class:`~cppo_lightning.module.CPPOModule`.

A rollout batch of B prompts x G responses arrives from the rollout callback. The step adds
advantages and the old and reference log-probs (:meth:`PolicyUpdate.prepare_update`), splits
the responses into mini-batches (one optimizer step each) and micro-batches (gradient
accumulation), and for each micro-batch computes clipped surrogate + beta * KL + the perception
term (:meth:`PolicyUpdate.compute_loss`). Every log-prob and entropy comes from the chunked LM
head of :mod:`cppo_lightning.logprobs`; the math is in :mod:`cppo_lightning.losses`,
:mod:`cppo_lightning.detection` and :mod:`cppo_lightning.perception`.

Data flow of one step::

    RolloutBatch --prepare_update--> + advantages, old_logp, ref_logp
        for mini in mini-batches:                 # one optimizer step each
            for micro in micro-batches(mini):     # gradient accumulation
                score(policy, micro) -> logp -> policy_loss + kl_coef * KL (+ perception term)
                backward(loss * weight)           # weights make the sum the mini-batch's loss
            clip gradients, optimizer.step()
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import TYPE_CHECKING, Any, cast

import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import ParallelStrategy

from cppo_lightning.batching import equalise_count, micro_batch_weights, pack_by_tokens
from cppo_lightning.logprobs import ResponseScores, Scoring, score_responses
from cppo_lightning.losses import (
    aggregate,
    global_std,
    group_advantages,
    kl_estimate,
)
from cppo_lightning.perception import (
    PerceptionTerm,
    detect_tokens,
    micro_batch,
)
from cppo_lightning.records import PromptBatch, RolloutBatch, UpdateRecord, pad_columns
from cppo_lightning.rollout import rollout_metrics

if TYPE_CHECKING:
    from cppo_lightning.module import CPPOModule

__all__ = ["PolicyUpdate", "is_fsdp"]

# The per-token fields of a PerceptionTerm that UpdateRecord keeps, in its field order.
_RECORDED = ("mask", "entropy", "entropy_removed")


def _joined(
    parts: list[tuple[torch.Tensor, torch.Tensor | None]], num_responses: int
) -> torch.Tensor | None:
    """The micro-batches' ``[n, L]`` pieces put back at their responses' rows (micro-batches
    packed by length are not in response order), or None if any piece is None."""
    if not parts or any(p is None for _, p in parts):
        return None
    first = cast(torch.Tensor, parts[0][1])
    out = first.new_zeros((num_responses, first.shape[1]))
    for index, piece in parts:
        out[index] = cast(torch.Tensor, piece)
    return out


def is_fsdp(module: Any) -> bool:
    """Whether ``module`` is wrapped by FSDP (the trainer's strategy model)."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # torch built without distributed
        return False
    return isinstance(module, FullyShardedDataParallel)


def _all(rollout: RolloutBatch) -> torch.Tensor:
    return torch.arange(rollout.num_responses, device=rollout.response_ids.device)


class PolicyUpdate:
    """The training step of :class:`~cppo_lightning.module.CPPOModule` (``module.update``).

    The module owns the state (policy, reference, settings, optimizer, the method's components)
    and calls :meth:`training_step` from its own; this class runs the step over it, as
    Lightning's loops run over their trainer. The math is in the components.
    """

    def __init__(self, module: CPPOModule) -> None:
        self.module = module

    @property
    def scoring(self) -> Scoring:
        """How every forward turns hidden states into token scores: the sampling temperature,
        the tokens the sampler suppresses, the LM-head chunk size."""
        return Scoring(
            self.module.temperature,
            tuple(getattr(self.module, "suppress_token_ids", ())),
            self.module.logprob_chunk_tokens,
        )

    def score(
        self,
        model: torch.nn.Module,
        rollout: RolloutBatch,
        index: torch.Tensor,
        vision: dict[str, torch.Tensor] | None = None,
    ) -> ResponseScores:
        """The forward of ``model`` on responses ``index`` (under ``vision`` when given), from
        which log-probs and entropies are read chunk by chunk."""
        return score_responses(
            model,
            rollout.prompts,
            rollout.prompt_index[index],
            rollout.response_ids[index],
            rollout.response_mask[index],
            self.scoring,
            vision,
        )

    def sequence_logps(
        self, model: torch.nn.Module, rollout: RolloutBatch, index: torch.Tensor
    ) -> torch.Tensor:
        """``[n, L]`` log-probs of the sampled tokens of responses ``index`` under ``model``."""
        return self.score(model, rollout, index).logps()

    def _reference_logps(self, rollout: RolloutBatch, index: torch.Tensor) -> torch.Tensor:
        if self.module.reference is not None:
            return self.sequence_logps(self.module.reference, rollout, index)
        assert self.module.policy is not None
        with self.module.policy.disable_adapter():  # type: ignore[operator]
            return self.sequence_logps(self.module.policy, rollout, index)

    @torch.no_grad()
    def prepare_update(self, rollout: RolloutBatch) -> RolloutBatch:
        """Add advantages, old log-probs (only if several mini-batches) and reference log-probs."""
        advantages = group_advantages(
            rollout.rewards,
            rollout.group_size,
            scale=self.module.advantage_scale,
            batch_std=self._global_reward_std(rollout)
            if self.module.advantage_scale == "batch"
            else None,
        )
        chunks = self._micro_batches(
            rollout, torch.arange(rollout.num_responses, device=self.module.device)
        )
        old_logp = ref_logp = removed_logp = None
        needs = self.component_needs
        assert self.module.policy is not None
        policy = self.module.policy
        if len(self._mini_batches(rollout)) > 1 or "old_logp" in needs:
            old_logp = self._per_response(
                rollout, chunks, lambda part: self.sequence_logps(policy, part, _all(part))
            )
        if self.module.kl_coef > 0:
            ref_logp = self._per_response(
                rollout, chunks, lambda part: self._reference_logps(part, _all(part))
            )
        if "removed_logp" in needs:
            views = rollout.prompts.views
            if views is None:
                raise ValueError(
                    "a component needs the information-removing view: set data.removing_view."
                )
            removed = views.vision("removing")
            removed_logp = self._per_response(
                rollout,
                chunks,
                lambda part: self.score(policy, part, _all(part), removed).logps(),
            )
        return dataclasses.replace(
            rollout,
            advantages=advantages,
            old_logp=old_logp,
            ref_logp=ref_logp,
            removed_logp=removed_logp,
        )

    @property
    def component_needs(self) -> frozenset[str]:
        """What the method's components ask :meth:`prepare_update` for (see
        :data:`cppo_lightning.seams.NEEDS`)."""
        components = [
            self.module.advantage,
            self.module.token_weighting,
            self.module.policy_loss,
            *self.module.extra_losses,
        ]
        return frozenset().union(*(c.needs for c in components if c is not None))

    def _global_reward_std(self, rollout: RolloutBatch) -> torch.Tensor | None:
        """The std of the rewards of the whole batch, all ranks together (``advantage_scale:
        batch`` under DDP/FSDP); None without a trainer, where the local batch is the batch."""
        if self.module._trainer is None:
            return None
        rewards = rollout.rewards.double()
        sums = torch.stack(
            [rewards.new_tensor(len(rewards)), rewards.sum(), rewards.square().sum()]
        )
        sums = self.module.trainer.strategy.reduce(sums, reduce_op="sum")
        return global_std(*sums).to(
            rollout.rewards.dtype
            if rollout.rewards.is_floating_point()
            else torch.get_default_dtype()
        )

    @staticmethod
    def _per_response(
        rollout: RolloutBatch,
        chunks: list[torch.Tensor],
        compute: Any,
    ) -> torch.Tensor:
        """``[N, L]`` from ``compute(rollout.take(chunk)) -> [n, l]`` over a partition."""
        length = rollout.response_ids.shape[1]
        return cast(
            torch.Tensor,
            _joined(
                [(i, pad_columns(compute(rollout.take(i)), length)) for i in chunks],
                rollout.num_responses,
            ),
        )

    def _mini_batches(self, rollout: RolloutBatch) -> list[torch.Tensor]:
        # A batch that lost rows to unreadable images may leave a smaller last mini-batch.
        size = self.module.mini_batch_size or rollout.prompts.num_prompts
        index = torch.arange(rollout.num_responses, device=self.module.device)
        return list(index.split(size * rollout.group_size))

    def _micro_batches(self, rollout: RolloutBatch, index: torch.Tensor) -> list[torch.Tensor]:
        """The micro-batches of responses ``index``: ``micro_batch_size`` responses each, or
        packed by length under ``micro_batch_tokens`` (see :mod:`cppo_lightning.batching`)."""
        if self.module.micro_batch_tokens is None:
            return list(index.split(self.module.micro_batch_size))
        lengths = rollout.response_mask[index].sum(1)
        prompt_length = rollout.prompts.input_ids.shape[1]
        micros = [
            index[i] for i in pack_by_tokens(lengths, prompt_length, self.module.micro_batch_tokens)
        ]
        if self.module._trainer is not None and self.module.trainer.world_size > 1:
            counts = self.module.trainer.strategy.all_gather(
                torch.tensor(len(micros), device=self.module.device)
            )
            micros = equalise_count(micros, int(torch.as_tensor(counts).max()))
        return micros

    def compute_loss(
        self, rollout: RolloutBatch, index: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], PerceptionTerm | None]:
        """Loss of one micro-batch: the policy loss on the weighted tokens + beta * KL + the
        perception term + the extra loss terms (the seams of :mod:`cppo_lightning.seams`).

        Returns:
            The loss, detached statistics, and the perception term (its ``[n, L]`` selected
            tokens and their entropies; None without a perception loss).
        """
        assert self.module.policy is not None and rollout.advantages is not None
        length = rollout.response_ids.shape[1]
        # The micro-batch alone, cut to its longest response: [n, l] fields with l <= L.
        rollout, index = rollout.take(index), torch.arange(len(index), device=index.device)
        assert rollout.advantages is not None
        mask = rollout.response_mask  # [n, l]
        scores = self.score(self.module.policy, rollout, index)  # hidden [n, l, H]
        logp = scores.logps()  # [n, l]
        old_logp = rollout.old_logp if rollout.old_logp is not None else logp.detach()
        micro = None
        if (
            self.module.perception_loss is not None
            or self.module.token_weighting
            or self.module.extra_losses
        ):
            micro = micro_batch(
                self.module.policy,
                rollout,
                index,
                scores,
                logp,
                self.module.loss_agg,
                self.module.max_new_tokens,
            )
        stats: dict[str, torch.Tensor] = {}
        loss_mask, weight = mask, None
        if self.module.token_weighting is not None:  # seam: which tokens carry the policy gradient
            assert micro is not None
            weight, token_stats = self.module.token_weighting(micro)  # [n, l]
            stats.update({f"train/tokens/{k}": v for k, v in token_stats.items()})
            if self.module.token_weighting.normalise == "selected":
                loss_mask = mask.bool() & weight.bool()  # the mean runs over selected tokens
                weight = None if weight.dtype == torch.bool else weight
        # Seam: the surrogate and its importance ratio (token level unless model.policy_loss).
        loss, loss_stats = self.module.policy_loss(
            logp,
            old_logp,
            rollout.advantages,
            loss_mask,
            agg=self.module.loss_agg,
            agg_constant=self.module.max_new_tokens,
            weight=weight,
        )
        stats.update({f"train/{k}": v for k, v in loss_stats.items()})
        stats["train/policy_loss"] = loss.detach()
        if rollout.sampler_logp is not None:
            # old_logp is the training forward before any update of this rollout batch (with
            # one mini-batch, this very forward), so any gap to the sampler is train/inference
            # drift: settings the sampler applied and training does not, or numerics.
            gap = (rollout.sampler_logp - old_logp.detach()).abs()  # [n, l]
            stats["rollout/logp_mismatch"] = (gap * mask).sum() / mask.sum().clamp(min=1)
        if self.module.kl_coef > 0:
            assert rollout.ref_logp is not None
            kl = aggregate(
                kl_estimate(logp, rollout.ref_logp, kind=self.module.kl_estimator),
                mask,
                self.module.loss_agg,
                self.module.max_new_tokens,
            )
            loss = loss + self.module.kl_coef * kl
            stats["train/kl"] = kl.detach()
        term = None
        if self.module.perception_loss is not None:  # seam: an auxiliary loss on image views
            assert micro is not None
            term = self.module.perception_loss(
                micro,
                self.module.token_selector,
                self.module.cpl_weight,
            )
            loss = loss + term.loss
            stats.update({f"perception/{k}": v for k, v in term.stats.items()})

            # Back to the rollout's L columns, so pieces of all micro-batches line up.
            def padded(t: torch.Tensor | None) -> torch.Tensor | None:
                return None if t is None else pad_columns(t, length)

            term = term._replace(
                mask=padded(term.mask),
                entropy=padded(term.entropy),
                entropy_removed=padded(term.entropy_removed),
            )
        for extra in self.module.extra_losses:  # seam: further loss terms
            assert micro is not None
            value, extra_stats = extra(micro)
            loss = loss + value
            stats.update({f"train/{extra.name}/{k}": v for k, v in extra_stats.items()})
        stats["train/loss"] = loss.detach()
        return loss, stats, term

    def detect_perception_tokens(self, rollout: RolloutBatch) -> RolloutBatch:
        """Detect perception tokens with the current (rollout-time) policy, before any update
        (no gating: that is applied in the loss). See :func:`perception.detect_tokens`."""
        assert self.module.policy is not None
        if self.module.token_selector is None:
            raise RuntimeError("no token selector: the perception_tokens callback sets it.")
        was_training = self.module.policy.training
        self.module.policy.eval()
        try:
            mask = detect_tokens(
                self.module.policy,
                rollout,
                dataclasses.replace(self.module.token_selector, gate_advantages=False),
                self.scoring,
                self._micro_batches(
                    rollout, torch.arange(rollout.num_responses, device=self.module.device)
                ),
            )
        finally:
            self.module.policy.train(was_training)
        return dataclasses.replace(rollout, perception_mask=mask)

    def accumulate_gradients(
        self,
        rollout: RolloutBatch,
        mini: torch.Tensor,
        sums: dict[str, float],
        terms: list[tuple[torch.Tensor, PerceptionTerm]],
    ) -> int:
        """Backward of the loss of mini-batch ``mini`` (response indices), micro-batch by
        micro-batch; adds each micro-batch's statistics to ``sums`` and its perception term to
        ``terms``, and returns the number of micro-batches.

        Each micro-batch's loss is weighted by its share of the mini-batch's ``loss_agg``
        normaliser, so the accumulated gradient is the mini-batch's as one batch, however it is
        cut (:func:`~cppo_lightning.batching.micro_batch_weights`).
        """
        micros = self._micro_batches(rollout, mini)
        weights = micro_batch_weights(
            [rollout.response_mask[m] for m in micros], self.module.loss_agg
        )
        for i, (micro, weight) in enumerate(zip(micros, weights, strict=True)):
            with self._gradient_sync(last=i == len(micros) - 1):
                loss, stats, term = self.compute_loss(rollout, micro)
                self._backward(loss * weight)
            for key, value in stats.items():
                sums[key] = sums.get(key, 0.0) + float(value)
            if term is not None:
                terms.append((micro, term))
        return len(micros)

    def _backward(self, loss: torch.Tensor) -> None:
        if self.module._trainer is None:  # outside a trainer (tests, scripts): plain autograd
            loss.backward()
        else:
            self.module.manual_backward(loss)

    def training_step(self, batch: PromptBatch) -> None:
        """Learn from the rollout batch collected for ``batch``: prepare it, then one optimizer
        step per mini-batch, and log."""
        start = time.perf_counter()
        rollout = self.prepare_update(self.module._take_rollout(batch))
        optimizer = cast(LightningOptimizer, self.module.optimizers())
        scheduler = self.module.lr_schedulers()
        sums: dict[str, float] = {}
        count = 0
        terms: list[tuple[torch.Tensor, PerceptionTerm]] = []
        for mini in self._mini_batches(rollout):
            if self._reached_max_steps():
                # Only after a batch that lost rows (fewer mini-batches): the run's steps are a
                # multiple of the batch's otherwise (checked at fit start).
                break
            optimizer.zero_grad()
            if self.module.advantage is not None:  # seam: the mini-batch's advantages, transformed
                rollout = self._transform_advantages(rollout, mini, sums)
            micros = self.accumulate_gradients(rollout, mini, sums, terms)
            count += micros
            grad_norm = self._clip_gradients()
            sums["train/grad_norm"] = sums.get("train/grad_norm", 0.0) + grad_norm * micros
            optimizer.step()
            if scheduler is not None:
                scheduler.step()  # type: ignore[union-attr]
        metrics = {key: value / max(count, 1) for key, value in sums.items()}
        # Lightning's x-axis for these: optimizer steps, as val/* and eval/* are logged, so the
        # curves of one run line up (its default would count rollout batches).
        metrics["step"] = float(self.module.global_step)
        metrics["train/lr"] = optimizer.param_groups[0]["lr"]
        metrics["train/update_seconds"] = time.perf_counter() - start
        metrics.update(rollout_metrics(rollout))
        # Responses scored 0 because a reward function raised (cumulative, per term).
        for name, errors in getattr(self.module.reward, "total_errors", {}).items():
            metrics[f"rollout/reward_errors/{name}"] = float(errors)
        # Averaged over ranks under DDP/FSDP, so the logged curve describes the whole batch. Every
        # rank must log the same keys (each key is one all-reduce).
        self.module.log_dict(metrics, batch_size=rollout.num_responses, sync_dist=True)
        self.module.log("reward", metrics["rollout/reward_mean"], prog_bar=True, logger=False)
        self.module.last_update = UpdateRecord(
            rollout,
            *(
                _joined([(i, getattr(t, f)) for i, t in terms], rollout.num_responses)
                for f in _RECORDED
            ),
        )

    def _transform_advantages(
        self, rollout: RolloutBatch, mini: torch.Tensor, sums: dict[str, float]
    ) -> RolloutBatch:
        """The rollout batch with the advantages of mini-batch ``mini`` replaced by the
        ``model.advantage`` component's (per token ``[N, L]`` as soon as one is)."""
        assert self.module.advantage is not None and rollout.advantages is not None
        new, stats = self.module.advantage(rollout, mini)  # [n] or [n, l]
        advantages = rollout.advantages
        if new.dim() == 2 and advantages.dim() == 1:
            advantages = advantages.unsqueeze(1).expand_as(rollout.response_mask)
        advantages = advantages.clone()
        if new.dim() == 2:
            new = pad_columns(new, advantages.shape[1])
        elif advantages.dim() == 2:
            new = new.unsqueeze(1).expand(-1, advantages.shape[1])
        advantages[mini] = new.to(advantages.dtype)
        # Weighted like the micro-batch statistics, which count once per micro-batch.
        count = len(self._micro_batches(rollout, mini))
        for key, value in stats.items():
            name = f"train/advantage/{key}"
            sums[name] = sums.get(name, 0.0) + float(value) * count
        return dataclasses.replace(rollout, advantages=advantages)

    def _reached_max_steps(self) -> bool:
        return (
            self.module._trainer is not None
            and 0 < self.module.trainer.max_steps <= self.module.global_step
        )

    def _gradient_sync(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        """Under DDP, gradients are all-reduced once per optimizer step, in the last
        micro-batch's backward; the others accumulate locally (no-op on other strategies)."""
        strategy = self.module.trainer.strategy if self.module._trainer is not None else None
        if last or not isinstance(strategy, ParallelStrategy):
            return contextlib.nullcontext()
        return strategy.block_backward_sync()

    def _clip_gradients(self) -> float:
        wrapped = self.module.trainer.strategy.model if self.module._trainer is not None else None
        if is_fsdp(wrapped):
            # Sharded gradients: only FSDP's own clip sees the global norm.
            limit = self.module.max_grad_norm if self.module.max_grad_norm > 0 else float("inf")
            return float(wrapped.clip_grad_norm_(limit))  # type: ignore[union-attr,operator]
        params = [p for p in self.module.trainable_parameters() if p.grad is not None]
        if self.module.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.module.max_grad_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        return float(norm)
