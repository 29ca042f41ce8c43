"""Typed records handed between the stages of a training step.

Shape letters: B prompts, G responses per prompt (the GRPO group), N = B * G responses,
P prompt tokens (left-padded), L response tokens (right-padded), D flattened patch size.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import torch


class ImageViews(NamedTuple):
    """The perturbed views of the B images of a prompt batch (spec: I+ and I-).

    Drawn once per prompt and epoch, so the G rollouts of a prompt share them. Each view keeps
    its image's H x W, so its patches have the same grid and the prompt ``input_ids`` are reused;
    only ``pixel_values`` change. A field is None when that view is not configured.

    Attributes:
        preserving: B information-preserving images ``[3, H_b, W_b]`` in [0, 1] (I+).
        removing: B information-removing images ``[3, H_b, W_b]`` in [0, 1] (I-).
        pixel_values_pos: ``[sum of patches, D]`` the processor's patches of ``preserving``.
        pixel_values_neg: ``[sum of patches, D]`` the processor's patches of ``removing``.
    """

    preserving: list[torch.Tensor] | None
    removing: list[torch.Tensor] | None
    pixel_values_pos: torch.Tensor | None
    pixel_values_neg: torch.Tensor | None

    def pixel_values(self, view: str) -> torch.Tensor:
        """Patches of ``view`` (``"preserving"`` or ``"removing"``)."""
        values = {"preserving": self.pixel_values_pos, "removing": self.pixel_values_neg}[view]
        if values is None:
            raise ValueError(
                f"the batch has no {view} view: set data.{view}_view (see configs/base.yaml)."
            )
        return values


class PromptBatch(NamedTuple):
    """B prompts with their images, as the DataModule collates them.

    A NamedTuple so that Lightning moves it to the device as it is.

    Attributes:
        input_ids: ``[B, P]`` prompt tokens, left-padded, image placeholders expanded.
        attention_mask: ``[B, P]`` 1 on real tokens.
        pixel_values: ``[sum of patches of the B images, D]`` the processor's flattened patches.
        image_grid_thw: ``[B, 3]`` patch grid (t, h, w) of each image.
        mm_token_type_ids: ``[B, P]`` 1 on image tokens (Qwen-VL M-RoPE needs it) or None.
        columns: Dataset column name -> B values (answers, questions, ...), for rewards and logs.
        row_index: ``[B]`` row of each prompt in its dataset split (seeds its views).
        images: B original images ``[3, H_b, W_b]`` in [0, 1], kept when views are configured.
        views: The perturbed views, added on the batch's device before training steps.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    mm_token_type_ids: torch.Tensor | None
    columns: dict[str, list[Any]]
    row_index: torch.Tensor | None = None
    images: list[torch.Tensor] | None = None
    views: ImageViews | None = None

    @property
    def num_prompts(self) -> int:
        return int(self.input_ids.shape[0])


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
        advantages: ``[N]`` group-normalised advantages.
        old_logp: ``[N, L]`` log-probs of the sampled tokens under the policy before the update.
        ref_logp: ``[N, L]`` the same under the frozen reference (None when the KL is off).
        perception_mask: ``[N, L]`` perception tokens detected with the rollout-time policy,
            before advantage gating (None when detection runs inside the update).
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
    advantages: torch.Tensor | None = None
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    perception_mask: torch.Tensor | None = None

    @property
    def num_responses(self) -> int:
        return int(self.response_ids.shape[0])


@dataclasses.dataclass(frozen=True)
class UpdateRecord:
    """What one training step learned from, for monitors (panels, detection precision).

    Attributes:
        rollout: The rollout batch with advantages filled in.
        perception_mask: ``[N, L]`` the tokens the perception loss used (after gating), or None
            when the objective selects no tokens.
    """

    rollout: RolloutBatch
    perception_mask: torch.Tensor | None = None
