"""The named seams of a training step: where a method plugs in.

A method (GRPO, PAPO, CPPO, DAPO, GSPO, VPPO, NoisyRollout, ...) is a few small components, each
an instance of one of the interfaces below, chosen by ``class_path`` in an overlay under
``configs/experiments/`` (``docs/methods.md`` lists which method uses which). The training step
(:mod:`cppo_lightning.update`) and the rollout (:mod:`cppo_lightning.callbacks.rollout`) call them
at fixed points and never branch on the method::

    rollout.view        RolloutView       which image each response of a group is sampled from
    rollout.filter      RolloutFilter     which groups are trained on; may ask for more prompts
    model.reward        WeightedReward    reward terms (DAPO's overlong penalty is one)
    model.advantage     AdvantageTransform   per-mini-batch change of the group advantages
    model.token_weighting  TokenWeighting     which tokens carry the policy gradient
    model.policy_loss   PolicyLoss        the surrogate and its importance ratio (token/sequence)
    model.perception_loss  PerceptionObjective   an auxiliary loss on image views (CPL, PAPO)
    model.extra_losses  LossTerm          further loss terms on the micro-batch (entropy terms)

Per-rollout-batch quantities a component needs are asked for through :attr:`Component.needs`
and computed once, without gradient, before the first optimizer step of the batch
(:meth:`cppo_lightning.update.PolicyUpdate.prepare_update`): ``"old_logp"`` (the rollout-time
policy's log-probs, otherwise only computed when a batch makes several optimizer steps) and
``"removed_logp"`` (the same policy's log-probs under the information-removing view).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
from torch import Tensor

if TYPE_CHECKING:
    from cppo_lightning.perception import MicroBatch
    from cppo_lightning.records import PromptBatch, RolloutBatch

__all__ = [
    "NEEDS",
    "AdvantageTransform",
    "Component",
    "GenerationGroup",
    "LossTerm",
    "PolicyLoss",
    "RolloutFilter",
    "RolloutView",
    "TokenWeighting",
]

#: What a component may ask :meth:`PolicyUpdate.prepare_update` to compute per rollout batch.
NEEDS = ("old_logp", "removed_logp")


class Component:
    """Base of every seam's components: declares the per-rollout-batch inputs it reads."""

    #: Names from :data:`NEEDS`; the step computes them once per rollout batch (no gradient).
    needs: ClassVar[frozenset[str]] = frozenset()
    #: Image views (``preserving``, ``removing``) the DataModule must draw for this component.
    views: ClassVar[tuple[str, ...]] = ()


class AdvantageTransform(Component, abc.ABC):
    """Changes the group advantages of one mini-batch before its micro-batches run.

    Called once per mini-batch with the rollout batch (advantages filled in, plus whatever
    :attr:`needs` asked for) and the mini-batch's response indices. Returns the new advantages
    of those responses, ``[n]`` or per token ``[n, L]``, and detached scalars to log under
    ``train/advantage/``.
    """

    @abc.abstractmethod
    def __call__(
        self, rollout: RolloutBatch, index: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]: ...


class TokenWeighting(Component, abc.ABC):
    """Which tokens of a micro-batch carry the policy gradient, and how they are normalised.

    Returns ``[n, L]`` weights (bool or float, 0 on tokens that carry no gradient) and detached
    scalars to log under ``train/tokens/``. :attr:`normalise` says what the token mean divides
    by: ``"selected"`` (the weighted tokens only: the 80/20 authors' code) or ``"all"`` (every
    valid token, so fewer selected tokens mean a smaller loss: TRL's and VPPO's code).
    """

    normalise: Literal["selected", "all"] = "all"
    #: Whether the component reads ``batch.scores.entropy()`` (one more pass over the LM head).
    reads_entropy: ClassVar[bool] = False

    @abc.abstractmethod
    def __call__(self, batch: MicroBatch) -> tuple[Tensor, dict[str, Tensor]]: ...


class PolicyLoss(Component, abc.ABC):
    """The clipped surrogate of a micro-batch: token-level ratio (PPO/GRPO) or sequence-level
    (GSPO). ``weight`` is the token weighting's ``[n, L]`` output (None: every valid token)."""

    @abc.abstractmethod
    def __call__(
        self,
        logp: Tensor,
        old_logp: Tensor,
        advantages: Tensor,
        mask: Tensor,
        *,
        agg: str,
        agg_constant: float | None,
        weight: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]: ...


class LossTerm(Component, abc.ABC):
    """A further term added to the micro-batch loss (e.g. an entropy bonus or penalty).
    Returns the weighted scalar (with its graph) and detached scalars logged under
    ``train/<name>/``."""

    name: ClassVar[str] = "term"

    @abc.abstractmethod
    def __call__(self, batch: MicroBatch) -> tuple[Tensor, dict[str, Tensor]]: ...


class RolloutFilter(Component, abc.ABC):
    """Which groups of a rollout batch are trained on (DAPO's dynamic sampling).

    The rollout callback calls :meth:`keep` on every scored rollout batch; while fewer than
    ``data.batch_size`` groups are kept it samples more prompts, at most :attr:`max_rounds`
    generation rounds in all, and logs ``rollout/sampling_rounds`` and
    ``rollout/dropped_groups``.
    """

    max_rounds: int = 1

    @abc.abstractmethod
    def keep(self, rollout: RolloutBatch) -> Tensor:
        """``[B]`` bool: the groups (prompts) to train on."""


class GenerationGroup(tuple):  # type: ignore[type-arg]
    """``(num_samples, vision)``: sample ``num_samples`` responses per prompt from ``vision``
    (the processor's image tensors; None = the original images)."""

    def __new__(cls, num_samples: int, vision: dict[str, Tensor] | None) -> GenerationGroup:
        return super().__new__(cls, (num_samples, vision))

    @property
    def num_samples(self) -> int:
        return int(self[0])

    @property
    def vision(self) -> dict[str, Tensor] | None:
        return self[1]  # type: ignore[no-any-return]


class RolloutView(Component, abc.ABC):
    """The images a group's responses are sampled from (NoisyRollout). Every response is still
    scored and trained against the original image: only generation sees the view.

    ``encode`` turns a list of ``[3, H, W]`` images of the batch into the processor's tensors
    (same layout as ``prompts.vision``). The parts' ``num_samples`` must sum to the group size;
    the responses of each prompt come out in part order.
    """

    @abc.abstractmethod
    def parts(
        self,
        prompts: PromptBatch,
        group_size: int,
        step: int,
        total_steps: int,
        encode: Callable[[Sequence[torch.Tensor]], dict[str, Tensor]],
    ) -> list[GenerationGroup]: ...

    def stats(self, rollout: RolloutBatch) -> dict[str, float]:
        """Scalars to log under ``rollout/`` for a rollout batch this view sampled (its
        ``generated_from`` says which part each response came from); none by default."""
        return {}
