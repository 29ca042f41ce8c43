"""Paired image views: the information-preserving (I+) and information-removing (I-) images.

Each prompt's views are drawn once per epoch from ``(view_seed, row index, epoch, view name)``,
so they are reproducible, independent of the training RNG, and shared by the G rollouts of the
prompt. The perturbations run on the device the batch lives on; the processor then patchifies the
views exactly as it patchified the original, and the patch grid must come out the same.
"""

from __future__ import annotations

from typing import Any

import torch

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
    """

    def __init__(
        self,
        image_processor: Any,
        preserving: torch.nn.Module | None,
        removing: torch.nn.Module | None,
        seed: int = 0,
    ) -> None:
        self.image_processor = image_processor
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
        pixels: dict[str, torch.Tensor | None] = {}
        for name, perturbation in self.perturbations.items():
            if perturbation is None:
                images[name] = pixels[name] = None
                continue
            perturbation.to(batch.images[0].device)
            views = [
                apply_seeded(perturbation, image, view_seed(self.seed, int(row), epoch, name))
                for image, row in zip(batch.images, batch.row_index.tolist(), strict=True)
            ]
            images[name] = views
            pixels[name] = self._patches(views, batch, name)
        return batch._replace(
            views=ImageViews(
                preserving=images["preserving"],
                removing=images["removing"],
                pixel_values_pos=pixels["preserving"],
                pixel_values_neg=pixels["removing"],
            )
        )

    def _patches(self, views: list[torch.Tensor], batch: PromptBatch, name: str) -> torch.Tensor:
        # The PIL-based processors work on host memory; the kornia draws above ran on the device.
        encoded = self.image_processor(
            images=[view.detach().float().cpu() for view in views],
            do_rescale=False,
            return_tensors="pt",
        )
        grid = encoded["image_grid_thw"].to(batch.image_grid_thw.device)
        if not torch.equal(grid, batch.image_grid_thw):
            raise ValueError(
                f"the {name} view gives image grids {grid.tolist()} but the originals give "
                f"{batch.image_grid_thw.tolist()}: data.{name}_view must keep every image's "
                "H x W so that the prompt tokens can be reused."
            )
        return encoded["pixel_values"].to(
            device=batch.pixel_values.device, dtype=batch.pixel_values.dtype
        )
