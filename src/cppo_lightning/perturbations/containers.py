"""List-taking perturbation containers, configurable from YAML (``class_path`` / ``init_args``).

kornia's ``AugmentationSequential(*args)`` cannot be built by jsonargparse because it takes
``*args``; :class:`OneOf` and :class:`Chain` take a ``list`` of modules instead. Both check after
every member that the image batch kept its ``B x C x H x W`` shape (docs/method.md §4: every
view keeps ``H x W``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["Chain", "OneOf", "check_same_shape"]


def _describe(module: nn.Module) -> str:
    text = repr(module)
    return text if len(text) <= 300 else f"{text[:297]}..."


def check_same_shape(module: nn.Module, before: torch.Size, after: object) -> None:
    """Raise if a perturbation did not return a tensor of the input's ``B x C x H x W`` shape.

    Args:
        module: the perturbation that produced ``after``, named in the error.
        before: the shape of the batch it was given.
        after: what it returned.

    Shape:
        - before: :math:`(B, C, H, W)`.
        - after: must be a tensor of the same shape.

    Raises:
        TypeError: ``after`` is not a tensor.
        ValueError: the shape changed; the message names ``module`` and both shapes.
    """
    if not isinstance(after, Tensor):
        raise TypeError(
            f"perturbation {_describe(module)} returned {type(after).__name__}, not a tensor; a "
            "perturbation must map a [B, 3, H, W] tensor to a [B, 3, H, W] tensor."
        )
    if after.shape == before:
        return
    if after.dim() == 4 and len(before) == 4 and after.shape[:2] == before[:2]:
        raise ValueError(
            f"perturbation {_describe(module)} changed the image size from "
            f"{before[-2]}x{before[-1]} to {after.shape[-2]}x{after.shape[-1]}; every view must "
            "keep H x W (docs/method.md §4). Remove it or configure it to keep the size (e.g. "
            "crop and resize back to H x W)."
        )
    raise ValueError(
        f"perturbation {_describe(module)} changed the batch shape from {list(before)} to "
        f"{list(after.shape)}; a perturbation must map [B, 3, H, W] to [B, 3, H, W] "
        "(docs/method.md §4). For a kornia augmentation check keepdim and that it does not add or "
        "drop channels."
    )


def _check_members(members: Sequence[nn.Module], owner: str) -> list[nn.Module]:
    if isinstance(members, nn.Module) or not isinstance(members, Sequence):
        raise ValueError(
            f"{owner} takes a list of perturbation modules; got {type(members).__name__}. "
            f"Write {owner}(members=[...]) (in YAML: init_args: {{members: [...]}})."
        )
    members = list(members)
    if not members:
        raise ValueError(f"{owner} needs at least one member; got an empty list.")
    for position, member in enumerate(members):
        if not isinstance(member, nn.Module):
            raise ValueError(
                f"{owner} member {position} is a {type(member).__name__}, not a torch.nn.Module; "
                "pass modules (e.g. kornia augmentations or cppo_lightning.perturbations classes)."
            )
    return members


def _as_batch(images: Tensor) -> tuple[Tensor, bool]:
    """Return a ``(B, C, H, W)`` view of ``images`` and whether a batch dim was added."""
    if images.dim() == 3:
        return images.unsqueeze(0), True
    if images.dim() == 4:
        return images, False
    raise ValueError(
        f"expected an image [3, H, W] or a batch [B, 3, H, W]; got shape {list(images.shape)}."
    )


class OneOf(nn.Module):
    r"""Apply one member drawn at random (one draw per call, shared by the whole batch).

    The draw uses the torch global CPU RNG (``torch.multinomial``), so
    :func:`~cppo_lightning.perturbations.apply_seeded` makes it reproducible. The index of the last
    drawn member is kept in ``last_index``.

    Args:
        members: the perturbations to choose from.
        weights: relative probabilities of the members (non-negative, positive sum); ``None`` is
            uniform.

    Shape:
        - Input: :math:`(B, C, H, W)` or :math:`(C, H, W)`.
        - Output: same as the input.

    Raises:
        ValueError: at construction on an empty or non-module member list or bad weights; at call
            time when the drawn member changes the shape (the message names it).

    Example:
        >>> import kornia.augmentation as K
        >>> one_of = OneOf([K.RandomRotation(10.0, p=1.0), K.ColorJitter(brightness=0.2)])
        >>> one_of(torch.rand(2, 3, 16, 16)).shape
        torch.Size([2, 3, 16, 16])
    """

    def __init__(self, members: list[nn.Module], weights: list[float] | None = None) -> None:
        super().__init__()
        checked = _check_members(members, "OneOf")
        if weights is None:
            weights = [1.0] * len(checked)
        weights = [float(w) for w in weights]
        if len(weights) != len(checked):
            raise ValueError(
                f"OneOf got {len(checked)} members but {len(weights)} weights; give one weight per "
                "member or leave weights out for a uniform choice."
            )
        if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(
                f"OneOf weights must be finite, non-negative and not all zero; got {weights}."
            )
        self.members = nn.ModuleList(checked)
        self.weights = weights
        self.last_index: int | None = None

    def extra_repr(self) -> str:
        return f"weights={self.weights}"

    def forward(self, images: Tensor) -> Tensor:
        """Apply one randomly drawn member to ``images``."""
        batch, unbatched = _as_batch(images)
        probabilities = torch.tensor(self.weights, dtype=torch.float64)
        index = int(torch.multinomial(probabilities, 1).item())
        self.last_index = index
        member = self.members[index]
        output = member(batch)
        check_same_shape(member, batch.shape, output)
        return output.squeeze(0) if unbatched else output


class Chain(nn.Module):
    r"""Apply every member in order.

    Args:
        members: the perturbations, applied first to last.

    Shape:
        - Input: :math:`(B, C, H, W)` or :math:`(C, H, W)`.
        - Output: same as the input.

    Raises:
        ValueError: at construction on an empty or non-module member list; at call time when a
            member changes the shape (the message names it).

    Example:
        >>> import kornia.augmentation as K
        >>> chain = Chain([K.RandomRotation(10.0, p=1.0), K.ColorJitter(brightness=0.2)])
        >>> chain(torch.rand(2, 3, 16, 16)).shape
        torch.Size([2, 3, 16, 16])
    """

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(_check_members(members, "Chain"))

    def forward(self, images: Tensor) -> Tensor:
        """Apply all members in order to ``images``."""
        batch, unbatched = _as_batch(images)
        output = batch
        for member in self.members:
            result = member(output)
            check_same_shape(member, output.shape, result)
            output = result
        return output.squeeze(0) if unbatched else output
