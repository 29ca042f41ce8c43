"""Image perturbations for CPPO's contrastive views and PAPO's masked view (docs/method.md §4, §5).

A perturbation is any ``torch.nn.Module`` mapping float RGB images ``[B, 3, H, W]`` in ``[0, 1]`` to
``[B, 3, H, W]``; kornia augmentations work as they are, and YAML configs swap them with
``class_path`` / ``init_args``. CPPO draws one perturbation per image per epoch from each family:

* information-preserving (``I+``, :func:`information_preserving`): a uniform choice of colour jitter
  (brightness factor in [0.2, 1.3], contrast and saturation in [0.2, 1.8], no hue), a perspective
  warp (distortion scale 0.2, applied with probability 0.5) and a rotation in [-10, 10] degrees with
  the canvas kept and black fill;
* information-removing (``I-``, :func:`information_removing`): a uniform choice of
  :class:`RandomOcclusion` (50 noise rectangles, sides U(0.05, 0.15) of the image side) and
  :class:`ZoomCrop` (crop f*H x f*W, f ~ U(0.6, 0.7), resized back).

The PAPO baseline's masked image is :func:`patch_masking` (14-px patches blacked out with
probability 0.6); NoisyRollout's annealed noise is :class:`DiffusionNoise`. Every view keeps
``H x W``; :class:`OneOf`, :class:`Chain` and :func:`apply_seeded` raise a ``ValueError`` naming
the module that changes it. :func:`apply_seeded` with a seed from :func:`view_seed` makes a view
reproducible without touching the training RNG.
"""

from __future__ import annotations

import kornia.augmentation as K

from cppo_lightning.perturbations.containers import Chain, OneOf
from cppo_lightning.perturbations.custom import PatchMask, RandomOcclusion, ZoomCrop
from cppo_lightning.perturbations.noise import DiffusionNoise
from cppo_lightning.perturbations.seeding import apply_seeded, view_seed

__all__ = [
    "Chain",
    "DiffusionNoise",
    "OneOf",
    "PatchMask",
    "RandomOcclusion",
    "ZoomCrop",
    "apply_seeded",
    "information_preserving",
    "information_removing",
    "patch_masking",
    "view_seed",
]


def information_preserving() -> OneOf:
    """Build the information-preserving family: one of colour jitter, perspective, rotation.

    kornia's ``ColorJitter`` takes torchvision's factors: a ``(low, high)`` brightness range draws a
    factor the image is multiplied by (``adjust_brightness_accumulative``; identity at 1), contrast
    blends with the grey mean and saturation with the greyscale image. ``hue=0.0`` skips the hue
    step. The rotation uses ``kornia.geometry.transform.affine`` with zero padding: the canvas is
    kept and the uncovered corners are black. ``RandomPerspective``'s ``p=0.5`` gates each image
    independently.

    Returns:
        A uniform :class:`OneOf` over the three kornia augmentations.

    Shape:
        - Input: :math:`(B, 3, H, W)` or :math:`(3, H, W)`.
        - Output: same as the input.
    """
    return OneOf(
        [
            K.ColorJitter(
                brightness=(0.2, 1.3),
                contrast=(0.2, 1.8),
                saturation=(0.2, 1.8),
                hue=0.0,
                p=1.0,
                keepdim=True,
            ),
            K.RandomPerspective(distortion_scale=0.2, p=0.5, keepdim=True),
            K.RandomRotation(degrees=10.0, p=1.0, keepdim=True),
        ]
    )


def information_removing() -> OneOf:
    """Build the information-removing family: one of random occlusion and zoom crop.

    Returns:
        A uniform :class:`OneOf` over ``RandomOcclusion()`` and ``ZoomCrop()``.

    Shape:
        - Input: :math:`(B, 3, H, W)` or :math:`(3, H, W)`.
        - Output: same as the input.
    """
    return OneOf([RandomOcclusion(keepdim=True), ZoomCrop(keepdim=True)])


def patch_masking() -> PatchMask:
    """Build PAPO's masked view (docs/method.md §5): 14-px patches blacked out with probability 0.6.

    Returns:
        ``PatchMask(patch_size=14, mask_prob=0.6)``.

    Shape:
        - Input: :math:`(B, 3, H, W)` or :math:`(3, H, W)`.
        - Output: same as the input.
    """
    return PatchMask(patch_size=14, mask_prob=0.6, keepdim=True)
