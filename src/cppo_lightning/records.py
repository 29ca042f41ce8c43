"""Typed records handed between the stages of a training step.

Shape letters: B prompts, G responses per prompt (the GRPO group), N = B * G responses,
P prompt tokens (left-padded), L response tokens (right-padded).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeVar

import torch

from cppo_lightning.families import select_vision


class ImageViews(NamedTuple):
    """The perturbed views of the images of a prompt batch (I+ and I-, docs/method.md).

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

    def image_positions(self, index: torch.Tensor) -> list[int]:
        """Positions in ``images`` (and in the views' image lists) of the images of prompts
        ``index``, prompt by prompt."""
        counts = self.image_counts.tolist()
        positions: list[int] = []
        for prompt in index.tolist():
            start = self.first_image(prompt)
            positions += range(start, start + counts[prompt])
        return positions

    def select(self, index: torch.Tensor) -> PromptBatch:
        """Prompts ``index`` (in that order) with everything they carry, images and views
        included (:meth:`subset` drops those)."""
        positions = self.image_positions(index)
        views = self.views
        if views is not None:

            def pick(images: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
                return None if images is None else [images[i] for i in positions]

            def pick_vision(
                vision: dict[str, torch.Tensor] | None,
            ) -> dict[str, torch.Tensor] | None:
                return None if vision is None else self.select_vision(index, vision)

            views = ImageViews(
                preserving=pick(views.preserving),
                removing=pick(views.removing),
                vision_pos=pick_vision(views.vision_pos),
                vision_neg=pick_vision(views.vision_neg),
            )
        return self.subset(index)._replace(
            images=None if self.images is None else [self.images[i] for i in positions],
            views=views,
        )

    @staticmethod
    def concat(batches: Sequence[PromptBatch], pad_token_id: int) -> PromptBatch:
        """The prompts of ``batches`` one after the other, as if collated together.

        Prompt tokens are left-padded again to the longest (``pad_token_id``, attention 0); the
        image tensors are concatenated in each key's layout (a per-prompt tensor whose other
        dimensions differ, Idefics3's images per prompt, is zero-padded: all-zero images are
        the processor's own padding). Images and views are kept when every batch has them.

        Raises:
            ValueError: If the batches differ in their columns, layout, or in carrying images,
                views or ``mm_token_type_ids``.
        """
        if not batches:
            raise ValueError("PromptBatch.concat needs at least one batch.")
        if len(batches) == 1:
            return batches[0]
        first = batches[0]
        for batch in batches[1:]:
            if batch.vision_layout != first.vision_layout or set(batch.columns) != set(
                first.columns
            ):
                raise ValueError(
                    "PromptBatch.concat: the batches differ in their image layout or columns "
                    f"({sorted(first.columns)} vs {sorted(batch.columns)}): they must come from "
                    "one dataset and processor."
                )
        length = max(b.input_ids.shape[1] for b in batches)

        def left(t: torch.Tensor, value: int) -> torch.Tensor:
            return torch.nn.functional.pad(t, (length - t.shape[1], 0), value=value)

        views = _all_or_none([b.views for b in batches], "views")
        return PromptBatch(
            input_ids=torch.cat([left(b.input_ids, pad_token_id) for b in batches]),
            attention_mask=torch.cat([left(b.attention_mask, 0) for b in batches]),
            vision={key: _cat_padded([b.vision[key] for b in batches]) for key in first.vision},
            vision_layout=first.vision_layout,
            image_counts=torch.cat([b.image_counts for b in batches]),
            mm_token_type_ids=_joined_or_none(
                [b.mm_token_type_ids for b in batches],
                "mm_token_type_ids",
                lambda ts: torch.cat([left(t, 0) for t in ts]),
            ),
            columns={name: [v for b in batches for v in b.columns[name]] for name in first.columns},
            row_index=_joined_or_none([b.row_index for b in batches], "row_index", torch.cat),
            images=_joined_or_none(
                [b.images for b in batches],
                "images",
                lambda ls: [i for images in ls for i in images],
            ),
            views=None if views is None else _concat_views(views),
        )


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

    def select_groups(self, groups: torch.Tensor) -> RolloutBatch:
        """The groups (prompts) ``groups`` only, in that order, as a rollout batch of their own:
        the prompts re-indexed (images and views kept, :meth:`PromptBatch.select`), every
        per-response field taken with them (see :meth:`take`).

        Shape:
            groups: ``[k]`` prompt indices; the result holds ``k * G`` responses.
        """
        size = self.group_size
        groups = groups.to(device=self.response_ids.device, dtype=torch.long)
        within = torch.arange(size, device=groups.device)
        rows = (groups.unsqueeze(1) * size + within).flatten()  # [k * G]
        return dataclasses.replace(
            self.take(rows),
            prompts=self.prompts.select(groups.to(self.prompts.input_ids.device)),
            prompt_index=torch.arange(len(groups), device=groups.device).repeat_interleave(size),
        )

    @property
    def num_groups(self) -> int:
        return self.num_responses // self.group_size

    @staticmethod
    def concat(batches: Sequence[RolloutBatch], pad_token_id: int) -> RolloutBatch:
        """The groups of ``batches`` one after the other (prompts by :meth:`PromptBatch.concat`).

        Per-token fields are right-padded to the longest response (``pad_token_id`` in
        ``response_ids``, 0 elsewhere); ``rollout_seconds`` is the sum. A field that is None in
        every batch stays None.

        Raises:
            ValueError: If the group sizes or reward terms differ, or a field is set in some
                batches and None in others.
        """
        if not batches:
            raise ValueError("RolloutBatch.concat needs at least one batch.")
        if len(batches) == 1:
            return batches[0]
        first = batches[0]
        for batch in batches[1:]:
            if batch.group_size != first.group_size or set(batch.reward_terms) != set(
                first.reward_terms
            ):
                raise ValueError(
                    "RolloutBatch.concat: the batches differ in group size or reward terms "
                    f"({first.group_size}, {sorted(first.reward_terms)} vs {batch.group_size}, "
                    f"{sorted(batch.reward_terms)})."
                )
        length = max(b.response_ids.shape[1] for b in batches)

        def right(value: float) -> Callable[[list[torch.Tensor]], torch.Tensor]:
            return lambda ts: torch.cat([pad_columns(t, length, value) for t in ts])

        def field(name: str, join: Callable[[list[Any]], Any]) -> Any:
            return _joined_or_none([getattr(b, name) for b in batches], name, join)

        def advantages(ts: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat(ts) if ts[0].dim() == 1 else right(0)(ts)

        offsets = [0]
        for batch in batches[:-1]:
            offsets.append(offsets[-1] + batch.prompts.num_prompts)
        return RolloutBatch(
            prompts=PromptBatch.concat([b.prompts for b in batches], pad_token_id),
            prompt_index=torch.cat(
                [b.prompt_index + o for b, o in zip(batches, offsets, strict=True)]
            ),
            response_ids=right(pad_token_id)([b.response_ids for b in batches]),
            response_mask=right(0)([b.response_mask for b in batches]),
            texts=[t for b in batches for t in b.texts],
            rewards=torch.cat([b.rewards for b in batches]),
            reward_terms={
                k: torch.cat([b.reward_terms[k] for b in batches]) for k in first.reward_terms
            },
            group_size=first.group_size,
            rollout_seconds=sum(b.rollout_seconds for b in batches),
            sampler_logp=field("sampler_logp", right(0)),
            advantages=field("advantages", advantages),
            old_logp=field("old_logp", right(0)),
            ref_logp=field("ref_logp", right(0)),
            perception_mask=field("perception_mask", right(0)),
            removed_logp=field("removed_logp", right(0)),
            truncated=field("truncated", torch.cat),
            generated_from=field("generated_from", torch.cat),
        )


def pad_columns(t: torch.Tensor, length: int, value: float = 0) -> torch.Tensor:
    """``[n, l] -> [n, length]``, right-padded with ``value`` (the inverse of ``take``'s cut)."""
    return torch.nn.functional.pad(t, (0, length - t.shape[1]), value=value)


_T = TypeVar("_T")


def _all_or_none(values: Sequence[_T | None], name: str) -> list[_T] | None:
    """``values`` when none is None, None when all are; refuses a mix (a concatenation would
    silently lose the field)."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    if len(present) != len(values):
        raise ValueError(
            f"cannot concatenate batches of which only some carry {name}: draw them all the "
            "same way."
        )
    return present


def _joined_or_none(values: Sequence[Any], name: str, join: Callable[[list[Any]], Any]) -> Any:
    present = _all_or_none(values, name)
    return None if present is None else join(present)


def _cat_padded(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.cat`` along dim 0, zero-padding the other dimensions to the largest first."""
    shape = [max(t.shape[d] for t in tensors) for d in range(tensors[0].dim())]
    padded = []
    for t in tensors:
        pad: list[int] = []
        for d in reversed(range(1, t.dim())):
            pad += [0, shape[d] - t.shape[d]]
        padded.append(torch.nn.functional.pad(t, pad) if any(pad) else t)
    return torch.cat(padded)


def _concat_views(views: list[ImageViews]) -> ImageViews:
    def images(name: str) -> list[torch.Tensor] | None:
        return _joined_or_none(
            [getattr(v, name) for v in views],
            name,
            lambda lists: [i for each in lists for i in each],
        )

    def vision(name: str) -> dict[str, torch.Tensor] | None:
        return _joined_or_none(
            [getattr(v, name) for v in views],
            name,
            lambda ds: {key: _cat_padded([d[key] for d in ds]) for key in ds[0]},
        )

    return ImageViews(
        preserving=images("preserving"),
        removing=images("removing"),
        vision_pos=vision("vision_pos"),
        vision_neg=vision("vision_neg"),
    )


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
