"""Typed records handed between the stages of a training step.

Shape letters: B prompts, G responses per prompt (the GRPO group), N = B * G responses,
P prompt tokens (left-padded), L response tokens (right-padded), D flattened patch size.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import torch


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
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    mm_token_type_ids: torch.Tensor | None
    columns: dict[str, list[Any]]

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

    @property
    def num_responses(self) -> int:
        return int(self.response_ids.shape[0])
