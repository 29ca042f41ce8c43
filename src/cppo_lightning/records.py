"""Typed records handed between the stages of a training step.

Shape letters: B prompts, G responses per prompt (the GRPO group), N = B * G responses,
P prompt tokens (left-padded), L response tokens (right-padded).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import torch

from cppo_lightning.families import select_vision


class ImageViews(NamedTuple):
    """The perturbed views of the images of a prompt batch (spec: I+ and I-).

    Drawn once per prompt and epoch, so the G rollouts of a prompt share them. Each view keeps
    its image's H x W, so the processor gives the same number of image tokens and the prompt
    ``input_ids`` are reused; only the image tensors change. A field is None when that view is
    not configured.

    Attributes:
        preserving: The information-preserving images ``[3, H_i, W_i]`` in [0, 1] (I+), one per
            image of the batch (``PromptBatch.images`` order).
        removing: The information-removing images (I-), likewise.
        vision_pos: The processor's image tensors of ``preserving`` (same keys and shapes as
            ``PromptBatch.vision``).
        vision_neg: The processor's image tensors of ``removing``.
    """

    preserving: list[torch.Tensor] | None
    removing: list[torch.Tensor] | None
    vision_pos: dict[str, torch.Tensor] | None
    vision_neg: dict[str, torch.Tensor] | None

    def vision(self, view: str) -> dict[str, torch.Tensor]:
        """Image tensors of ``view`` (``"preserving"`` or ``"removing"``)."""
        values = {"preserving": self.vision_pos, "removing": self.vision_neg}[view]
        if values is None:
            raise ValueError(
                f"the batch has no {view} view: set data.{view}_view (see configs/base.yaml)."
            )
        return values


class PromptBatch(NamedTuple):
    """B prompts with their images, as the DataModule collates them.

    A NamedTuple so that Lightning moves it to the device as it is. The image tensors are the
    processor's, whatever the model family (see :mod:`cppo_lightning.families`); use
    :meth:`select_vision` to pick the images of some prompts.

    Attributes:
        input_ids: ``[B, P]`` prompt tokens, left-padded, image placeholders expanded.
        attention_mask: ``[B, P]`` 1 on real tokens.
        vision: The processor's image tensors (Qwen-VL: ``pixel_values`` ``[patches, D]`` and
            ``image_grid_thw`` ``[images, 3]``; LLaVA: ``pixel_values`` ``[images, 3, H, W]``;
            Idefics3: ``pixel_values`` and ``pixel_attention_mask`` with one row per prompt).
        vision_layout: Key of ``vision`` -> what its first dimension counts (``prompt``,
            ``image`` or ``patch``).
        image_counts: ``[B]`` images of each prompt.
        mm_token_type_ids: ``[B, P]`` 1 on image tokens (Qwen-VL M-RoPE needs it) or None.
        columns: Dataset column name -> B values (answers, questions, ...), for rewards and logs.
        row_index: ``[B]`` row of each prompt in its dataset split (seeds its views).
        images: The batch's images ``[3, H_i, W_i]`` in [0, 1], prompt by prompt, kept when views
            are configured.
        views: The perturbed views, added on the batch's device before training steps.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    vision: dict[str, torch.Tensor]
    vision_layout: dict[str, str]
    image_counts: torch.Tensor
    mm_token_type_ids: torch.Tensor | None
    columns: dict[str, list[Any]]
    row_index: torch.Tensor | None = None
    images: list[torch.Tensor] | None = None
    views: ImageViews | None = None

    @property
    def num_prompts(self) -> int:
        return int(self.input_ids.shape[0])

    def select_vision(
        self, index: torch.Tensor, vision: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """Image tensors of prompts ``index`` (repeats allowed): of the originals, or of
        ``vision`` (a view's tensors, same layout) when given."""
        return select_vision(
            self.vision if vision is None else vision,
            self.vision_layout,  # type: ignore[arg-type]
            self.image_counts,
            index,
        )

    def subset(self, index: torch.Tensor) -> PromptBatch:
        """Prompts ``index`` only (for generating in chunks); views and images are dropped."""
        rows = index.tolist()
        return PromptBatch(
            input_ids=self.input_ids[index],
            attention_mask=self.attention_mask[index],
            vision=self.select_vision(index),
            vision_layout=self.vision_layout,
            image_counts=self.image_counts[index],
            mm_token_type_ids=(
                self.mm_token_type_ids[index] if self.mm_token_type_ids is not None else None
            ),
            columns={name: [values[i] for i in rows] for name, values in self.columns.items()},
            row_index=self.row_index[index] if self.row_index is not None else None,
        )

    def first_image(self, prompt: int) -> int:
        """Position in ``images`` of the first image of ``prompt``."""
        return int(self.image_counts[:prompt].sum())


@dataclasses.dataclass(frozen=True)
class RolloutBatch:
    """N = B * G sampled responses of one rollout batch and everything the update needs.

    Responses ``g * G ... g * G + G - 1`` belong to prompt ``g`` (groups are contiguous).
    The rollout callback fills the sampling fields; the module adds the ``None`` fields with
    :func:`dataclasses.replace` before it updates the policy.

    Attributes:
        prompts: The B prompts the responses answer.
        prompt_index: ``[N]`` the prompt each response answers, ``arange(B).repeat_interleave(G)``.
        response_ids: ``[N, L]`` sampled tokens, right-padded after the first end-of-sequence.
        response_mask: ``[N, L]`` 1 on real response tokens (the end-of-sequence token included).
        texts: N decoded responses.
        rewards: ``[N]`` total reward.
        reward_terms: Term name -> ``[N]`` value of that term (accuracy, format, ...).
        group_size: G.
        rollout_seconds: Wall-clock time spent generating and scoring.
        sampler_logp: ``[N, L]`` each token's log-prob under the distribution the sampler drew
            it from (0 on padding), for ``rollout/logp_mismatch``; None if the engine gives none.
        advantages: ``[N]`` group-normalised advantages (``[N, L]`` after a per-token
            :class:`~cppo_lightning.seams.AdvantageTransform`).
        old_logp: ``[N, L]`` log-probs of the sampled tokens under the policy before the update.
        ref_logp: ``[N, L]`` the same under the frozen reference (None when the KL is off).
        perception_mask: ``[N, L]`` perception tokens detected with the rollout-time policy,
            before advantage gating (None when detection runs inside the update).
        removed_logp: ``[N, L]`` log-probs of the sampled tokens under the rollout-time policy
            with the information-removing view (a component's ``needs``, e.g. VPPO's masked
            image), or None.
        truncated: ``[N]`` bool, True where a response hit ``max_new_tokens`` without an
            end-of-sequence token, or None when the rollout did not record it.
        generated_from: ``[N]`` int, which part of a :class:`~cppo_lightning.seams.RolloutView`
            each response was sampled from (0 = the first part), or None without a view.
    """

    prompts: PromptBatch
    prompt_index: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    texts: list[str]
    rewards: torch.Tensor
    reward_terms: dict[str, torch.Tensor]
    group_size: int
    rollout_seconds: float = 0.0
    sampler_logp: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    perception_mask: torch.Tensor | None = None
    removed_logp: torch.Tensor | None = None
    truncated: torch.Tensor | None = None
    generated_from: torch.Tensor | None = None

    @property
    def num_responses(self) -> int:
        return int(self.response_ids.shape[0])

    def take(self, index: torch.Tensor) -> RolloutBatch:
        """Responses ``index`` only, every ``[N, L]`` field cut to the longest of them (the
        right padding all of them share is dropped, so a micro-batch of short responses costs
        only their length). The prompts are shared; ``group_size`` keeps its value although
        the rows need not form whole groups (advantages are computed before taking)."""
        length = max(1, int(self.response_mask[index].sum(1).max())) if len(index) else 1

        def cut(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[index][:, :length]

        rows = index.tolist()
        return dataclasses.replace(
            self,
            prompt_index=self.prompt_index[index],
            response_ids=self.response_ids[index][:, :length],
            response_mask=self.response_mask[index][:, :length],
            texts=[self.texts[i] for i in rows],
            rewards=self.rewards[index],
            reward_terms={k: v[index] for k, v in self.reward_terms.items()},
            sampler_logp=cut(self.sampler_logp),
            advantages=(
                None
                if self.advantages is None
                else cut(self.advantages)  # per token [N, L]
                if self.advantages.dim() == 2
                else self.advantages[index]
            ),
            old_logp=cut(self.old_logp),
            ref_logp=cut(self.ref_logp),
            perception_mask=cut(self.perception_mask),
            removed_logp=cut(self.removed_logp),
            truncated=self.truncated[index] if self.truncated is not None else None,
            generated_from=self.generated_from[index] if self.generated_from is not None else None,
        )


def pad_columns(t: torch.Tensor, length: int, value: float = 0) -> torch.Tensor:
    """``[n, l] -> [n, length]``, right-padded with ``value`` (the inverse of ``take``'s cut)."""
    return torch.nn.functional.pad(t, (0, length - t.shape[1]), value=value)


@dataclasses.dataclass(frozen=True)
class UpdateRecord:
    """What one training step learned from, for monitors (panels, detection precision).

    Attributes:
        rollout: The rollout batch with advantages filled in.
        perception_mask: ``[N, L]`` the tokens the perception loss used (after gating), or None
            when the objective selects no tokens.
        entropy: ``[N, L]`` the entropy under the original image of the tokens detection scored
            (0 in the responses it did not score, e.g. gated out), or None.
        entropy_removed: ``[N, L]`` the same under the information-removing view, or None.
    """

    rollout: RolloutBatch
    perception_mask: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    entropy_removed: torch.Tensor | None = None
