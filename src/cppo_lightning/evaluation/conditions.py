"""Image conditions: what the model is shown in place of each image, to measure how much it looks.

- ``original``: the dataset's image.
- ``blank``: a black image of the same size.
- ``mean``: the image filled with its own mean colour (global colour kept, all structure gone).
- ``shuffled``: another row's image of the same size, the strongest check that answers come from
  *this* image (a row whose size no other row shares gets another row's image resized to its own).
- ``preserving``: the configured information-preserving view I+, seeded as in training.
- ``removing``: the configured information-removing view I-, seeded as in training.

Every condition keeps each image's height and width, so the prompt's tokens do not change: only
the pixels do. The views are drawn as the DataModule draws them at epoch 0 (``view_seed(view_seed,
row, 0, "preserving")``, ``"preserving#k"`` for a row's k-th image), then rounded to 8 bits.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Sequence

import torch
from PIL import Image, ImageStat

from cppo_lightning.data.rows import image_tensor, tensor_image
from cppo_lightning.perturbations import apply_seeded, view_seed

CONDITIONS = ("original", "blank", "mean", "shuffled", "preserving", "removing")
VIEW_CONDITIONS = ("preserving", "removing")


def check_conditions(names: Sequence[str]) -> list[str]:
    """The condition names, in order and without repeats; ValueError naming a wrong one."""
    unknown = [name for name in names if name not in CONDITIONS]
    if unknown:
        raise ValueError(
            f"unknown image condition(s) {unknown}: --images takes {', '.join(CONDITIONS)}."
        )
    if not names:
        raise ValueError(f"--images needs at least one of {', '.join(CONDITIONS)}.")
    return list(dict.fromkeys(names))


def shuffle_partners(sizes: Sequence[tuple], seed: int) -> tuple[list[int], list[bool]]:
    """For each row, the row whose images it is shown under ``shuffled``, never itself.

    Rows are matched within groups of equal image sizes by a seeded derangement (a random cycle),
    so no image is resized; a row alone in its size group takes the next row of one seeded cycle
    through all rows, its image resized (flagged True). A single-row set has no partner: its row
    keeps its own image (flagged True too, so that it is counted).

    Args:
        sizes: Per row, the sizes of its images (any hashable value per row).
        seed: Seed of the derangements.

    Returns:
        ``(partner row of each row, whether its images are resized)``.
    """
    n = len(sizes)
    rng = random.Random(seed)
    partners = list(range(n))
    resized = [True] * n
    groups: dict[tuple, list[int]] = defaultdict(list)
    for row, size in enumerate(sizes):
        groups[size].append(row)
    loners = []
    for size in sorted(groups, key=repr):
        rows = groups[size]
        if len(rows) < 2:
            loners += rows
            continue
        cycle = rows[:]
        rng.shuffle(cycle)
        for i, row in enumerate(cycle):
            partners[row] = cycle[(i + 1) % len(cycle)]
            resized[row] = False
    if loners and n > 1:
        cycle = list(range(n))
        rng.shuffle(cycle)
        position = {row: i for i, row in enumerate(cycle)}
        for row in loners:
            partners[row] = cycle[(position[row] + 1) % n]
    return partners, resized


class ImageConditions:
    """Makes the images of a row under each condition.

    Args:
        preserving: The information-preserving perturbation (``[B, 3, H, W]`` -> same), for
            ``preserving``; None if not configured.
        removing: The information-removing perturbation, for ``removing``.
        view_seed: Base seed of the views (``data.view_seed`` of the training run).
    """

    def __init__(
        self,
        preserving: torch.nn.Module | None = None,
        removing: torch.nn.Module | None = None,
        view_seed: int = 0,
    ) -> None:
        self.views = {"preserving": preserving, "removing": removing}
        self.view_seed = view_seed

    def check(self, names: Sequence[str]) -> None:
        """ValueError if a requested view condition has no perturbation configured."""
        for name in names:
            if name in self.views and self.views[name] is None:
                raise ValueError(
                    f"--images {name} needs the {name} view: give a fit config with "
                    f"data.{name}_view (--config), or drop {name}."
                )

    def apply(
        self,
        condition: str,
        images: list[Image.Image],
        row: int,
        partner_images: Callable[[], list[Image.Image]] | None = None,
    ) -> list[Image.Image]:
        """The images of row ``row`` under ``condition`` (same sizes as ``images``).

        Args:
            condition: One of :data:`CONDITIONS`.
            images: The row's images, decoded and sized.
            row: The row's index in its set (seeds its views).
            partner_images: For ``shuffled``: the images of the row's partner (see
                :func:`shuffle_partners`).
        """
        if condition == "original":
            return images
        if condition == "blank":
            return [Image.new("RGB", image.size, (0, 0, 0)) for image in images]
        if condition == "mean":
            return [
                Image.new("RGB", image.size, tuple(round(c) for c in ImageStat.Stat(image).mean))
                for image in images
            ]
        if condition == "shuffled":
            if partner_images is None:
                raise ValueError("the shuffled condition needs the partner row's images.")
            others = partner_images()
            return [_resized(others[i % len(others)], image.size) for i, image in enumerate(images)]
        if condition in self.views:
            perturbation = self.views[condition]
            if perturbation is None:
                raise ValueError(f"no {condition} view is configured.")
            out = []
            for k, image in enumerate(images):
                key = condition if k == 0 else f"{condition}#{k}"
                seed = view_seed(self.view_seed, row, 0, key)
                out.append(tensor_image(apply_seeded(perturbation, image_tensor(image), seed)))
            return out
        raise ValueError(f"unknown image condition {condition!r}; expected one of {CONDITIONS}.")


def _resized(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    return image if image.size == size else image.resize(size, Image.Resampling.BICUBIC)
