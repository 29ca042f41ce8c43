"""Reproducible perturbation draws that leave the caller's RNG untouched.

kornia draws its parameters from torch's global RNG. :func:`apply_seeded` runs a perturbation inside
``torch.random.fork_rng`` after seeding, so a view depends only on the seed, and training randomness
is unaffected. :func:`view_seed` derives independent seeds per image, epoch and stream (e.g.
``"preserving"`` and ``"removing"``) from one run seed.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor, nn

from cppo_lightning.perturbations.containers import check_same_shape

__all__ = ["apply_seeded", "view_seed"]

# BLAKE2b personalisation (at most 16 bytes): separates these hashes from any other use.
_SEED_DOMAIN = b"cppo-view-seed1"


def view_seed(seed: int, index: int, epoch: int, stream: str) -> int:
    """Derive a well-mixed 63-bit seed for one view of one image.

    The four values are hashed with BLAKE2b, so neighbouring indices, epochs or streams give
    unrelated seeds (unlike ``seed + index``).

    Args:
        seed: the run's base seed.
        index: the image's index in the dataset.
        epoch: the epoch (views are redrawn every epoch, docs/method.md §4).
        stream: which view, e.g. ``"preserving"`` or ``"removing"``.

    Returns:
        An integer in ``[0, 2**63)``.

    Raises:
        ValueError: when seed, index or epoch is not an int or stream is not a str.

    Example:
        >>> view_seed(0, 1, 0, "removing") == view_seed(0, 1, 0, "removing")
        True
        >>> view_seed(0, 1, 0, "removing") != view_seed(0, 1, 0, "preserving")
        True
    """
    for name, value in (("seed", seed), ("index", index), ("epoch", epoch)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(
                f"view_seed: {name} must be an int; got {value!r} ({type(value).__name__})."
            )
    if not isinstance(stream, str):
        raise ValueError(f"view_seed: stream must be a str such as 'removing'; got {stream!r}.")
    # Integers never contain '|', and stream comes last, so the encoding is unambiguous.
    message = f"{seed}|{index}|{epoch}|".encode() + stream.encode("utf-8")
    digest = hashlib.blake2b(message, digest_size=8, person=_SEED_DOMAIN).digest()
    return int.from_bytes(digest, "big") >> 1


def apply_seeded(perturbation: nn.Module, images: Tensor, seed: int) -> Tensor:
    """Apply ``perturbation`` reproducibly from ``seed`` without touching the global RNG state.

    The call runs inside ``torch.random.fork_rng`` (the CPU generator, plus the current CUDA
    device's generator when ``images`` is on CUDA), seeds those generators with ``seed`` and
    restores them afterwards. Only the forked generators are seeded (not ``torch.manual_seed``,
    which would also reseed every other CUDA device without restoring it). The result is clamped to
    ``[0, 1]``.

    Args:
        perturbation: any module mapping ``[B, 3, H, W]`` to ``[B, 3, H, W]`` (kornia augmentations,
            :class:`~cppo_lightning.perturbations.OneOf`, ...).
        images: float images in ``[0, 1]``.
        seed: an int in ``[0, 2**64)``, e.g. from :func:`view_seed`.

    Returns:
        The perturbed images, same shape, dtype and device as ``images``, in ``[0, 1]``.

    Shape:
        - images: :math:`(3, H, W)` or :math:`(B, 3, H, W)`.
        - output: same as ``images``.

    Raises:
        ValueError: on a non-float or wrongly shaped ``images``, a bad ``seed``, or a perturbation
            that changes the shape (the message names it).
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"apply_seeded: seed must be an int in [0, 2**64); got {seed!r}.")
    if not isinstance(images, Tensor) or not images.is_floating_point():
        raise ValueError(
            "apply_seeded: images must be a float tensor in [0, 1]; got "
            f"{getattr(images, 'dtype', type(images).__name__)}. "
            "Convert uint8 with images.float() / 255."
        )
    if images.dim() not in (3, 4) or images.shape[-3] != 3:
        raise ValueError(
            "apply_seeded: images must be [3, H, W] or [B, 3, H, W] (RGB); "
            f"got {list(images.shape)}."
        )
    unbatched = images.dim() == 3
    batch = images.unsqueeze(0) if unbatched else images
    # Fork (and seed) the CPU generator and, for CUDA images, that device's generator only.
    cuda_devices: list[int] = []
    if batch.device.type == "cuda":
        index = batch.device.index
        cuda_devices = [index if index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=cuda_devices, device_type="cuda"):
        torch.random.default_generator.manual_seed(seed)
        for device_index in cuda_devices:
            with torch.cuda.device(device_index):
                torch.cuda.manual_seed(seed)
        output = perturbation(batch)
    check_same_shape(perturbation, batch.shape, output)
    output = output.clamp(0.0, 1.0)
    return output.squeeze(0) if unbatched else output
