"""Paired image views: the information-preserving (I+) and information-removing (I-) images.

Each prompt's views are drawn once per epoch from ``(view_seed, row index, epoch, view name)``,
so they are reproducible, independent of the training RNG, and shared by the G rollouts of the
prompt. The perturbations run on the device the batch lives on; the processor then patchifies the
views exactly as it patchified the original, and the patch grid must come out the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from cppo_lightning.families import Family, encode_images
from cppo_lightning.perturbations import apply_seeded, view_seed
from cppo_lightning.records import ImageViews, PromptBatch

VIEW_NAMES = ("preserving", "removing")


class ViewMaker:
    """Draws the views of a prompt batch and turns them into patches.

    Args:
        image_processor: The processor's image processor (accepts float tensors in [0, 1]).
        preserving: Information-preserving perturbation (a [B,3,H,W] -> [B,3,H,W] module), or None.
        removing: Information-removing perturbation, or None.
        seed: Base seed of the view draws.
        family: The model family (how its image processor takes images).
    """

    def __init__(
        self,
        image_processor: Any,
        preserving: torch.nn.Module | None,
        removing: torch.nn.Module | None,
        seed: int = 0,
        *,
        family: Family,
    ) -> None:
        self.image_processor = image_processor
        self.family = family
        self.perturbations = {"preserving": preserving, "removing": removing}
        self.seed = seed

    @property
    def enabled(self) -> bool:
        return any(p is not None for p in self.perturbations.values())

    def __call__(self, batch: PromptBatch, epoch: int) -> PromptBatch:
        """Return ``batch`` with its :class:`ImageViews` (drawn on the batch's device)."""
        if batch.images is None or batch.row_index is None:
            raise ValueError("the batch carries no images: it was collated without views.")
        images: dict[str, list[torch.Tensor] | None] = {}
        pixels: dict[str, dict[str, torch.Tensor] | None] = {}
        for name, perturbation in self.perturbations.items():
            if perturbation is None:
                images[name] = pixels[name] = None
                continue
            perturbation.to(batch.images[0].device)
            views = [
                apply_seeded(perturbation, image, view_seed(self.seed, row, epoch, key))
                for image, (row, key) in zip(batch.images, self._keys(batch, name), strict=True)
            ]
            images[name] = views
            pixels[name] = self.encode(views, batch, f"data.{name}_view")
        return batch._replace(
            views=ImageViews(
                preserving=images["preserving"],
                removing=images["removing"],
                vision_pos=pixels["preserving"],
                vision_neg=pixels["removing"],
            )
        )

    @staticmethod
    def _keys(batch: PromptBatch, name: str) -> list[tuple[int, str]]:
        """(row, view key) of every image: the k-th image of a row (k > 0) gets ``name#k``."""
        assert batch.row_index is not None
        keys = []
        for row, count in zip(batch.row_index.tolist(), batch.image_counts.tolist(), strict=True):
            keys += [(int(row), name if k == 0 else f"{name}#{k}") for k in range(count)]
        return keys

    def encode(
        self, views: Sequence[torch.Tensor], batch: PromptBatch, setting: str
    ) -> dict[str, torch.Tensor]:
        """The processor's image tensors of ``views`` (one ``[3, H, W]`` image in [0, 1] per
        image of ``batch``), on the device and in the dtype of ``batch.vision``; ``setting`` (the
        key that made them, e.g. ``data.removing_view``) names the culprit when an image's H x W
        differs from its original's."""
        # The PIL-based processors work on host memory; the kornia draws above ran on the device.
        encoded = encode_images(
            self.image_processor, views, batch.image_counts.tolist(), self.family
        )
        for key, original in batch.vision.items():
            value = encoded[key]
            same = value.shape == original.shape and (
                value.is_floating_point() or torch.equal(value.to(original.device), original)
            )
            if not same:
                raise ValueError(
                    f"{setting} gives {key} of shape {tuple(value.shape)} but the originals "
                    f"give {tuple(original.shape)} (or different image grids/masks): "
                    f"{setting} must keep every image's H x W so that the prompt tokens "
                    "can be reused."
                )
            encoded[key] = value.to(device=original.device, dtype=original.dtype)
        return encoded
