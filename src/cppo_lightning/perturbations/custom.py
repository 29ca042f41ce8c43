"""Custom image perturbations written as kornia augmentations (docs/method.md §4 and §5).

Each class follows kornia 0.9's conventions: the hyperparameters are fixed in ``__init__``, every
random number is drawn by the module's parameter generator (``_param_generator``, called from
``forward_parameters`` through kornia's torch global RNG), and ``apply_transform`` is a
deterministic function of the image and the drawn parameters. The last draw is kept in
``module._params`` and ``module(images, params=module._params)`` replays it exactly.

* :class:`RandomOcclusion` -- information-removing: rectangles of uniform RGB noise.
* :class:`ZoomCrop` -- information-removing: crop a random ``f*H x f*W`` window and resize it back.
* :class:`PatchMask` -- PAPO's masked view: black out square patches independently.

All three take float images in ``[0, 1]`` and keep ``B x C x H x W``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from kornia.augmentation import IntensityAugmentationBase2D
from kornia.augmentation._2d.geometric.base import GeometricAugmentationBase2D
from kornia.augmentation.random_generator import RandomGeneratorBase
from kornia.geometry.transform import warp_affine
from torch import Tensor

__all__ = ["PatchMask", "RandomOcclusion", "ZoomCrop"]

# Noise seeds are drawn in [0, 2**62): well inside what torch.Generator.manual_seed and int64
# accept.
_NOISE_SEED_HIGH = 2**62


def _check_probability(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(
            f"{name} must be a probability in [0, 1]; got {value!r}. Pass e.g. {name}=1.0."
        )
    return float(value)


def _check_fraction_range(scale: Sequence[float], name: str) -> tuple[float, float]:
    """Validate a ``(low, high)`` side-fraction range with ``0 < low <= high <= 1``."""
    example = f"{name}=(0.05, 0.15)" if name == "scale" else f"{name}=(0.6, 0.7)"
    if isinstance(scale, (str, bytes)) or not isinstance(scale, Sequence) or len(scale) != 2:
        raise ValueError(
            f"{name} must be a pair (low, high) of side fractions; got {scale!r}. "
            f"Pass e.g. {example}."
        )
    low, high = scale
    for value in (low, high):
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
        ):
            raise ValueError(
                f"{name} must hold two finite numbers; got {scale!r}. Pass e.g. {example}."
            )
    if not 0.0 < low <= high <= 1.0:
        raise ValueError(
            f"{name} must satisfy 0 < low <= high <= 1 (fractions of the image side); "
            f"got {scale!r}. Pass e.g. {example}."
        )
    return float(low), float(high)


def _draw_uniform(
    shape: tuple[int, ...],
    low: float,
    high: float,
    same_on_batch: bool,
    device: Any,
    dtype: torch.dtype,
) -> Tensor:
    """Draw ``U(low, high)`` of ``shape`` from the global RNG; ``same_on_batch`` shares row 0."""
    draw_shape = (1, *shape[1:]) if same_on_batch else shape
    draw = torch.rand(draw_shape, device=device, dtype=dtype) * (high - low) + low
    return draw.expand(shape).clone() if same_on_batch else draw


def _draw_noise_seeds(batch_size: int, same_on_batch: bool, device: Any) -> Tensor:
    """Draw one int64 seed per sample (global RNG) for the noise made in ``apply_transform``."""
    count = 1 if same_on_batch else batch_size
    seeds = torch.randint(0, _NOISE_SEED_HIGH, (count,), dtype=torch.long, device=device)
    return seeds.expand(batch_size).clone() if same_on_batch else seeds


class _TorchDrawGenerator(RandomGeneratorBase):
    """Base of this module's parameter generators: they draw with plain ``torch.rand`` in
    ``forward`` (see :func:`_draw_uniform`), so kornia's sampler set-up has nothing to build."""

    def make_samplers(self, device: torch.device, dtype: torch.dtype) -> None:
        return None


class _OcclusionGenerator(_TorchDrawGenerator):
    """Draw the rectangles and noise seeds of :class:`RandomOcclusion`.

    Returns ``ys``, ``xs``, ``heights``, ``widths`` (int64, ``(B, N)``; the half-open pixel
    rectangle ``[ys, ys + heights) x [xs, xs + widths)``) and ``noise_seed`` (int64, ``(B,)``).
    """

    def __init__(self, num_rectangles: int, scale: tuple[float, float]) -> None:
        super().__init__()
        self.num_rectangles = num_rectangles
        self.scale = scale

    def __repr__(self) -> str:
        return f"num_rectangles={self.num_rectangles}, scale={self.scale}"

    def forward(
        self, batch_shape: tuple[int, ...], same_on_batch: bool = False
    ) -> dict[str, Tensor]:
        batch_size, height, width = batch_shape[0], batch_shape[-2], batch_shape[-1]
        shape = (batch_size, self.num_rectangles)
        low, high = self.scale
        extent = torch.tensor([height, width], device=self.device, dtype=torch.long)
        # Side fractions, independent for height and width: (B, N, 2).
        fractions = _draw_uniform((*shape, 2), low, high, same_on_batch, self.device, self.dtype)
        sizes = (fractions * extent.to(self.dtype)).round().long()
        sizes = torch.minimum(sizes.clamp(min=1), extent)
        # Uniform top-left corner such that the rectangle lies fully inside the image.
        slots = extent - sizes + 1
        position = _draw_uniform((*shape, 2), 0.0, 1.0, same_on_batch, self.device, self.dtype)
        starts = torch.minimum((position * slots.to(self.dtype)).floor().long(), slots - 1)
        return {
            "ys": starts[..., 0],
            "xs": starts[..., 1],
            "heights": sizes[..., 0],
            "widths": sizes[..., 1],
            "noise_seed": _draw_noise_seeds(batch_size, same_on_batch, self.device),
        }


class RandomOcclusion(IntensityAugmentationBase2D):
    r"""Cover random rectangles with uniform RGB noise (docs/method.md §4, information-removing).

    ``num_rectangles`` rectangles are drawn per image. Each side is an independent ``U(*scale)``
    fraction of the image side (rounded to whole pixels, at least 1), the position is uniform with
    the rectangle fully inside the image, and every covered pixel gets independent ``U(0, 1)`` noise
    per channel. Rectangles may overlap.

    The per-pixel noise is part of the draw: the parameters hold one int64 ``noise_seed`` per image
    and ``apply_transform`` generates the noise from a ``torch.Generator`` on the input's device
    seeded with it, so replaying ``params`` reproduces the output bit for bit (the noise stream
    differs between CPU and CUDA).

    Args:
        num_rectangles: rectangles per image; ``0`` is the identity.
        scale: ``(low, high)`` range of each side as a fraction of the image side,
            ``0 < low <= high <= 1``.
        p: probability of applying the perturbation to each image.
        same_on_batch: use the same rectangles and noise for every image of the batch.
        keepdim: return a ``(C, H, W)`` input as ``(C, H, W)`` instead of ``(1, C, H, W)``.

    Shape:
        - Input: :math:`(C, H, W)` or :math:`(B, C, H, W)`, float in ``[0, 1]``.
        - Output: :math:`(B, C, H, W)` (``keepdim=True``: the input's shape).

    Raises:
        ValueError: on a negative or non-integer ``num_rectangles``, a bad ``scale`` or ``p``.

    Example:
        >>> aug = RandomOcclusion(num_rectangles=1, scale=(1.0, 1.0))
        >>> out = aug(torch.zeros(2, 3, 8, 8))
        >>> bool((out > 0).all())
        True
        >>> bool((aug(torch.zeros(2, 3, 8, 8), params=aug._params) == out).all())
        True
    """

    def __init__(
        self,
        num_rectangles: int = 50,
        scale: tuple[float, float] = (0.05, 0.15),
        p: float = 1.0,
        same_on_batch: bool = False,
        keepdim: bool = False,
    ) -> None:
        if (
            isinstance(num_rectangles, bool)
            or not isinstance(num_rectangles, int)
            or num_rectangles < 0
        ):
            raise ValueError(
                f"num_rectangles must be a non-negative integer; got {num_rectangles!r}. "
                "Pass e.g. num_rectangles=50 (docs/method.md §4), or 0 for no occlusion."
            )
        scale = _check_fraction_range(scale, "scale")
        p = _check_probability(p, "p")
        super().__init__(p=p, same_on_batch=same_on_batch, keepdim=keepdim)
        self.num_rectangles = num_rectangles
        self.scale = scale
        self._param_generator = _OcclusionGenerator(num_rectangles, scale)

    def apply_transform(
        self,
        input: Tensor,
        params: dict[str, Tensor],
        flags: dict[str, Any],
        transform: Tensor | None = None,
    ) -> Tensor:
        batch_size, channels, height, width = input.shape
        device = input.device
        ys = params["ys"].to(device)
        xs = params["xs"].to(device)
        if ys.shape[-1] == 0 or batch_size == 0:
            return input.clone()
        rows = torch.arange(height, device=device)
        cols = torch.arange(width, device=device)
        # (B, N, H) and (B, N, W) memberships; their product summed over N counts the covering
        # rectangles.
        in_rows = (rows >= ys[..., None]) & (rows < (ys + params["heights"].to(device))[..., None])
        in_cols = (cols >= xs[..., None]) & (cols < (xs + params["widths"].to(device))[..., None])
        coverage = torch.bmm(in_rows.transpose(1, 2).float(), in_cols.float())  # (B, H, W)
        mask = (coverage > 0)[:, None]  # (B, 1, H, W)
        noise = torch.empty_like(input)
        for index, seed in enumerate(params["noise_seed"].tolist()):
            generator = torch.Generator(device=device)
            generator.manual_seed(int(seed))
            sample = torch.rand(
                (channels, height, width), generator=generator, device=device, dtype=torch.float32
            )
            noise[index] = sample.to(input.dtype)
        return torch.where(mask, noise, input)


class _ZoomCropGenerator(_TorchDrawGenerator):
    """Draw the crop of :class:`ZoomCrop`.

    Returns ``scale`` (``(B,)``, the side fraction ``f``) and ``x0``, ``y0`` (``(B,)``, the crop's
    top-left edge in pixels, continuous, uniform in ``[0, (1 - f) W]`` and ``[0, (1 - f) H]``).
    """

    def __init__(self, scale: tuple[float, float]) -> None:
        super().__init__()
        self.scale = scale

    def __repr__(self) -> str:
        return f"scale={self.scale}"

    def forward(
        self, batch_shape: tuple[int, ...], same_on_batch: bool = False
    ) -> dict[str, Tensor]:
        batch_size, height, width = batch_shape[0], batch_shape[-2], batch_shape[-1]
        low, high = self.scale
        fraction = _draw_uniform((batch_size,), low, high, same_on_batch, self.device, self.dtype)
        position = _draw_uniform((batch_size, 2), 0.0, 1.0, same_on_batch, self.device, self.dtype)
        return {
            "scale": fraction,
            "x0": position[:, 0] * (1.0 - fraction) * width,
            "y0": position[:, 1] * (1.0 - fraction) * height,
        }


class ZoomCrop(GeometricAugmentationBase2D):
    r"""Crop a random ``f*H x f*W`` window, resized back to ``H x W`` (docs/method.md §4, I-).

    One side fraction ``f ~ U(*scale)`` serves both sides, so the aspect ratio is kept; the window's
    position is uniform over the image (continuous, sub-pixel). The window is resampled bilinearly
    with the half-pixel convention of ``F.interpolate(..., align_corners=False)``: output pixel
    ``u`` reads the input at ``x0 + (u + 0.5) f - 0.5``, and reads that fall up to half a pixel
    outside the image use the border pixel, so a constant image stays constant. ``transform_matrix``
    is that map from input to output pixel coordinates, so boxes and keypoints follow the image in
    an :class:`~kornia.augmentation.AugmentationSequential`.

    Args:
        scale: ``(low, high)`` range of the side fraction ``f``, ``0 < low <= high <= 1``.
        p: probability of applying the perturbation to each image.
        same_on_batch: use the same window for every image of the batch.
        keepdim: return a ``(C, H, W)`` input as ``(C, H, W)`` instead of ``(1, C, H, W)``.

    Shape:
        - Input: :math:`(C, H, W)` or :math:`(B, C, H, W)`, float in ``[0, 1]``.
        - Output: :math:`(B, C, H, W)` (``keepdim=True``: the input's shape).

    Raises:
        ValueError: on a bad ``scale`` or ``p``.

    Example:
        >>> aug = ZoomCrop()
        >>> aug(torch.rand(2, 3, 64, 80)).shape
        torch.Size([2, 3, 64, 80])
    """

    def __init__(
        self,
        scale: tuple[float, float] = (0.6, 0.7),
        p: float = 1.0,
        same_on_batch: bool = False,
        keepdim: bool = False,
    ) -> None:
        scale = _check_fraction_range(scale, "scale")
        p = _check_probability(p, "p")
        super().__init__(p=p, same_on_batch=same_on_batch, keepdim=keepdim)
        self.scale = scale
        self._param_generator = _ZoomCropGenerator(scale)

    def compute_transformation(
        self, input: Tensor, params: dict[str, Tensor], flags: dict[str, Any]
    ) -> Tensor:
        """Return the ``(B, 3, 3)`` map from input to output pixel coordinates (pixel centres)."""
        fraction = params["scale"].to(device=input.device, dtype=input.dtype)
        x0 = params["x0"].to(device=input.device, dtype=input.dtype)
        y0 = params["y0"].to(device=input.device, dtype=input.dtype)
        matrix = torch.zeros(fraction.shape[0], 3, 3, device=input.device, dtype=input.dtype)
        # u = (x + 0.5 - x0) / f - 0.5, likewise for y.
        matrix[:, 0, 0] = 1.0 / fraction
        matrix[:, 0, 2] = (0.5 - x0) / fraction - 0.5
        matrix[:, 1, 1] = 1.0 / fraction
        matrix[:, 1, 2] = (0.5 - y0) / fraction - 0.5
        matrix[:, 2, 2] = 1.0
        return matrix

    def apply_transform(
        self,
        input: Tensor,
        params: dict[str, Tensor],
        flags: dict[str, Any],
        transform: Tensor | None = None,
    ) -> Tensor:
        if transform is None:
            transform = self.compute_transformation(input, params, flags)
        height, width = input.shape[-2:]
        transform = transform.to(device=input.device, dtype=input.dtype)
        # align_corners=True makes warp_affine read the matrix in pixel-centre coordinates.
        return warp_affine(
            input,
            transform[:, :2, :],
            (height, width),
            mode="bilinear",
            padding_mode="border",
            align_corners=True,
        )


class _PatchMaskGenerator(_TorchDrawGenerator):
    """Draw the patch mask of :class:`PatchMask`.

    Returns ``patch_mask`` (bool, ``(B, ceil(H / patch_size), ceil(W / patch_size))``; ``True``
    means black).
    """

    def __init__(self, patch_size: int, mask_prob: float) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.mask_prob = mask_prob

    def __repr__(self) -> str:
        return f"mask_prob={self.mask_prob}"

    def forward(
        self, batch_shape: tuple[int, ...], same_on_batch: bool = False
    ) -> dict[str, Tensor]:
        batch_size, height, width = batch_shape[0], batch_shape[-2], batch_shape[-1]
        grid = (batch_size, -(-height // self.patch_size), -(-width // self.patch_size))
        draw = _draw_uniform(grid, 0.0, 1.0, same_on_batch, self.device, self.dtype)
        return {"patch_mask": draw < self.mask_prob}


class PatchMask(IntensityAugmentationBase2D):
    r"""Black out square patches independently at random (PAPO's masked view, docs/method.md §5).

    The image is tiled into ``patch_size x patch_size`` patches from the top-left corner (the last
    row and column of patches may be partial) and each patch is set to ``0`` with probability
    ``mask_prob``.

    Args:
        patch_size: side of a patch in pixels.
        mask_prob: probability that a patch is blacked out.
        p: probability of applying the perturbation to each image.
        same_on_batch: use the same patch mask for every image of the batch.
        keepdim: return a ``(C, H, W)`` input as ``(C, H, W)`` instead of ``(1, C, H, W)``.

    Shape:
        - Input: :math:`(C, H, W)` or :math:`(B, C, H, W)`, float in ``[0, 1]``.
        - Output: :math:`(B, C, H, W)` (``keepdim=True``: the input's shape).

    Raises:
        ValueError: on a bad ``patch_size``, ``mask_prob`` or ``p``; at apply time, when replayed
            params were drawn for an image of another size.

    Example:
        >>> aug = PatchMask(patch_size=4, mask_prob=1.0)
        >>> bool((aug(torch.rand(1, 3, 10, 10)) == 0).all())
        True
    """

    def __init__(
        self,
        patch_size: int = 14,
        mask_prob: float = 0.6,
        p: float = 1.0,
        same_on_batch: bool = False,
        keepdim: bool = False,
    ) -> None:
        if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
            raise ValueError(
                f"patch_size must be a positive integer (pixels); got {patch_size!r}. "
                "Pass e.g. patch_size=14 (PAPO, docs/method.md §5)."
            )
        mask_prob = _check_probability(mask_prob, "mask_prob")
        p = _check_probability(p, "p")
        super().__init__(p=p, same_on_batch=same_on_batch, keepdim=keepdim)
        self.patch_size = patch_size
        self.mask_prob = mask_prob
        self._param_generator = _PatchMaskGenerator(patch_size, mask_prob)
        self.flags = {"patch_size": patch_size}

    def apply_transform(
        self,
        input: Tensor,
        params: dict[str, Tensor],
        flags: dict[str, Any],
        transform: Tensor | None = None,
    ) -> Tensor:
        height, width = input.shape[-2:]
        patch_size = int(flags["patch_size"])
        patches = params["patch_mask"].to(input.device)
        expected = (-(-height // patch_size), -(-width // patch_size))
        if tuple(patches.shape[-2:]) != expected:
            raise ValueError(
                f"PatchMask params hold a {tuple(patches.shape[-2:])} patch grid but a "
                f"{height}x{width} image with patch_size={patch_size} needs {expected}; replay "
                "params only on images of the size they were drawn for."
            )
        mask = patches.repeat_interleave(patch_size, dim=-2).repeat_interleave(patch_size, dim=-1)
        mask = mask[..., :height, :width][:, None]  # (B, 1, H, W)
        return torch.where(mask, torch.zeros((), dtype=input.dtype, device=input.device), input)
