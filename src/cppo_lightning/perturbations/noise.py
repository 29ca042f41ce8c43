"""NoisyRollout's annealed image noise (arXiv 2504.13055) as a kornia augmentation.

NoisyRollout generates part of each group's rollouts from a noise-distorted copy of the image and
trains every response against the clean image; the distortion weakens over training. The
distortion is the forward process of a DDPM-style diffusion: at timestep ``t``,
``x_t = sqrt(abar_t) * x + sqrt(1 - abar_t) * eps`` with ``eps ~ N(0, 1)`` per pixel and channel,
then clamped to ``[0, 1]``; ``t`` anneals from ``initial`` toward 0::

    t = noise_timestep(step, total_steps)             # 500 at the start, ~0 at the end
    noise = DiffusionNoise(timestep=t)
    noisy = apply_seeded(noise, images, seed)         # [B, 3, H, W], same H x W

:class:`cppo_lightning.methods.NoisyRollout` (the ``rollout.view`` seam) generates the last
``num_noisy`` responses of each group from this view (the layout of :func:`noisy_rows`), while the
log-probs of every response stay those of the clean image; ``configs/experiments/noisyrollout.yaml``
turns it on.

Sources, all from the authors' code ``John-AI-Lab/NoisyRollout`` (an EasyR1 fork; HEAD 000b58d,
2025-05-20), ``verl/utils/image_aug.py`` (``ImageAugmenter``), ``verl/trainer/ray_trainer.py``
(``fit``) and ``training_scripts/*.sh``; the paper's text beyond its abstract was not available
to us:

- noise: ``_add_gaussian_noise``: ``betas = sigmoid(linspace(-6, 6, 1000)) * (5e-3 - 1e-5) +
  1e-5``, ``abar = cumprod(1 - betas)``, ``x_t = sqrt(abar[t]) x + sqrt(1 - abar[t]) eps`` on the
  ``ToTensor`` image in ``[0, 1]``, then ``clamp(0, 1)``. Not kornia's ``RandomGaussianNoise``
  (which adds noise without shrinking the image), hence a module of our own. At ``t = 500`` the
  image is scaled by 0.863 and the noise std is 0.505; at ``t = 0``, 0.99999 and 0.0047.
- strength: ``gaussian_noise_step = 500`` (Geo3K script; 450 for the K12 script), the initial
  ``t`` and, per ``training_scripts/README.md``, the paper's initial noise strength alpha_0
  (suggested 400, 450 or 500); ``t = int(gaussian_noise_step * decay)``.
- schedule: ``decay_mode = sigmoid``, ``decay = 1 - sigmoid(coef * (step - mid) / total)``, with
  ``decay_coef = 30`` (Geo3K; 60 for K12) and ``decay_sig_mid_step = 40``; ``step`` is the trainer's
  ``global_step`` (1-based, one per rollout batch) and ``total`` its ``training_steps``. The other
  modes of ``ImageAugmenter.augment`` (``exp``, ``pow``, ``linear``; anything else = no decay) are
  here as well.
- rollouts: with ``is_noisy``, each prompt is generated ``rollout.n = 6`` times from the clean image
  and 6 times from the noisy one (n1 = n2), and the 12 form one GRPO group (the ``uid`` is per
  prompt); the batch the losses see carries the clean image's inputs. The GRPO baseline script
  samples 12 clean responses.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from kornia.augmentation import IntensityAugmentationBase2D
from torch import Tensor

from cppo_lightning.perturbations.custom import (
    _check_probability,
    _draw_noise_seeds,
    _TorchDrawGenerator,
)

__all__ = [
    "DECAY_MODES",
    "DiffusionNoise",
    "diffusion_alpha_bar",
    "noise_decay",
    "noise_timestep",
    "noisy_rows",
]

DECAY_MODES = ("sigmoid", "linear", "pow", "exp", "constant")


def diffusion_alpha_bar(
    num_timesteps: int = 1000, beta_range: tuple[float, float] = (1e-5, 5e-3)
) -> Tensor:
    """The cumulative signal fraction ``abar_t = prod_{s<=t}(1 - beta_s)`` of NoisyRollout's noise.

    ``beta_s = sigmoid(linspace(-6, 6, num_timesteps))_s * (high - low) + low``, computed in
    float32 as the authors do (``_add_gaussian_noise``).

    Shape:
        - output: ``[num_timesteps]``, float32, decreasing from just below 1.
    """
    low, high = beta_range
    betas = torch.sigmoid(torch.linspace(-6.0, 6.0, num_timesteps, dtype=torch.float32))
    betas = betas * (high - low) + low  # [T]
    return torch.cumprod(1.0 - betas, dim=0)  # [T]


def noise_decay(
    step: int,
    total_steps: int,
    *,
    mode: str = "sigmoid",
    coef: float = 30.0,
    midpoint: float = 40.0,
) -> float:
    """The fraction of the initial noise strength left at ``step`` (``ImageAugmenter.augment``).

    With ``x = step / total_steps``:

    - ``"sigmoid"`` (default; the authors' scripts): ``1 - sigmoid(coef * (x - midpoint / total))``,
      about 1 early, 0.5 at ``step = midpoint``, about 0 after; ``coef`` sets the steepness in
      units of the whole run (30 for Geo3K, 60 for K12), ``midpoint`` is in steps (40).
    - ``"linear"``: ``1 - x``; ``"pow"``: ``1 - x ** coef``; ``"exp"``:
      ``1 - coef ** (total_steps - step)``; ``"constant"``: 1 (no annealing).

    Args:
        step: The rollout-batch index (the authors' 1-based ``global_step``).
        total_steps: The run's number of rollout batches (> 0).
        mode: One of :data:`DECAY_MODES`.
        coef: The mode's coefficient (``decay_coef``).
        midpoint: The sigmoid's midpoint in steps (``decay_sig_mid_step``).

    Returns:
        The decay factor (in [0, 1] for ``step`` in ``[0, total_steps]`` and a sensible ``coef``).

    Raises:
        ValueError: On ``total_steps <= 0`` or an unknown ``mode``.
    """
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps <= 0:
        raise ValueError(f"total_steps must be a positive int, got {total_steps!r}.")
    if mode not in DECAY_MODES:
        raise ValueError(f"mode must be one of {DECAY_MODES}, got {mode!r}.")
    x = step / total_steps
    if mode == "sigmoid":
        z = coef * (x - midpoint / total_steps)
        # 1 - sigmoid(z) = sigmoid(-z), written to stay finite for large |z|.
        return 1.0 / (1.0 + math.exp(z)) if z < 700 else 0.0
    if mode == "linear":
        return 1.0 - x
    if mode == "pow":
        return 1.0 - x**coef
    if mode == "exp":
        return 1.0 - coef ** (total_steps - step)
    return 1.0


def noise_timestep(
    step: int,
    total_steps: int,
    *,
    initial: int = 500,
    mode: str = "sigmoid",
    coef: float = 30.0,
    midpoint: float = 40.0,
) -> int:
    """The diffusion timestep (noise strength) at ``step``: ``int(initial * noise_decay(...))``.

    Truncated toward 0 and clamped to ``[0, initial]``, like the authors' ``int(noise_step *
    decay)``. Defaults: the Geo3K script (``gaussian_noise_step=500``, ``decay_coef=30``,
    ``decay_sig_mid_step=40``).

    Raises:
        ValueError: On a negative ``initial`` or the errors of :func:`noise_decay`.
    """
    if isinstance(initial, bool) or not isinstance(initial, int) or initial < 0:
        raise ValueError(f"initial must be an int >= 0 (a diffusion timestep), got {initial!r}.")
    decay = noise_decay(step, total_steps, mode=mode, coef=coef, midpoint=midpoint)
    return min(initial, max(0, int(initial * decay)))


def noisy_rows(batch_size: int, group_size: int, num_noisy: int) -> Tensor:
    """Which rows of a group-contiguous rollout batch are generated from the noisy image.

    In each group of ``group_size`` responses the last ``num_noisy`` are noisy, the authors'
    layout (``n`` clean then ``n`` noisy per prompt, so ``num_noisy = group_size / 2``).

    Shape:
        - output: ``[batch_size * group_size]``, dtype bool.
    """
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an int >= 1, got {group_size!r}.")
    if not (isinstance(num_noisy, int) and 0 <= num_noisy <= group_size):
        raise ValueError(f"num_noisy must be an int in [0, group_size], got {num_noisy!r}.")
    if not (isinstance(batch_size, int) and batch_size >= 0):
        raise ValueError(f"batch_size must be an int >= 0, got {batch_size!r}.")
    within = torch.arange(group_size) >= group_size - num_noisy  # [G]
    return within.repeat(batch_size)  # [B * G]


class _DiffusionNoiseGenerator(_TorchDrawGenerator):
    """Draw the parameters of :class:`DiffusionNoise`: ``timestep`` and ``noise_seed``.

    ``timestep`` (int64, ``(B,)``) is the module's current timestep, recorded so that replaying
    the params reproduces the strength used even after the schedule moved on; ``noise_seed``
    (int64, ``(B,)``) seeds the per-pixel Gaussian noise made in ``apply_transform``.
    """

    def __init__(self, timestep: int) -> None:
        super().__init__()
        self.timestep = timestep

    def __repr__(self) -> str:
        return f"timestep={self.timestep}"

    def forward(
        self, batch_shape: tuple[int, ...], same_on_batch: bool = False
    ) -> dict[str, Tensor]:
        batch_size = batch_shape[0]
        return {
            "timestep": torch.full((batch_size,), self.timestep, dtype=torch.long),
            "noise_seed": _draw_noise_seeds(batch_size, same_on_batch, self.device),
        }


class DiffusionNoise(IntensityAugmentationBase2D):
    r"""NoisyRollout's distortion: ``clamp(sqrt(abar_t) x + sqrt(1 - abar_t) eps, 0, 1)``.

    ``abar`` is :func:`diffusion_alpha_bar`; ``eps`` is independent ``N(0, 1)`` noise per pixel
    and channel. As in :class:`~cppo_lightning.perturbations.RandomOcclusion`, the noise is part of
    the draw: the parameters hold one int64 ``noise_seed`` per image (and the ``timestep`` used),
    and ``apply_transform`` generates the noise from a ``torch.Generator`` on the input's device
    seeded with it, so replaying ``params`` reproduces the output bit for bit (the noise stream
    differs between CPU and CUDA).

    The strength follows the training schedule: set :attr:`timestep` (e.g. to
    :func:`noise_timestep` of the current rollout batch) before drawing; it is the only attribute
    meant to change after construction.

    Args:
        timestep: The diffusion timestep ``t`` in ``[0, num_timesteps)``; the authors start at 500.
        num_timesteps: Length of the beta schedule (the authors' 1000).
        beta_range: ``(low, high)`` of the sigmoid beta schedule (the authors' ``(1e-5, 5e-3)``).
        p: probability of applying the perturbation to each image.
        same_on_batch: use the same noise for every image of the batch.
        keepdim: return a ``(C, H, W)`` input as ``(C, H, W)`` instead of ``(1, C, H, W)``.

    Shape:
        - Input: :math:`(C, H, W)` or :math:`(B, C, H, W)`, float in ``[0, 1]``.
        - Output: :math:`(B, C, H, W)` (``keepdim=True``: the input's shape), in ``[0, 1]``.

    Raises:
        ValueError: on a bad ``timestep``, ``num_timesteps``, ``beta_range`` or ``p``.

    Example:
        >>> aug = DiffusionNoise(timestep=500)
        >>> out = aug(torch.full((1, 3, 8, 8), 0.5))
        >>> bool((aug(torch.full((1, 3, 8, 8), 0.5), params=aug._params) == out).all())
        True
    """

    alpha_bar: Tensor  # [num_timesteps], a non-persistent buffer

    def __init__(
        self,
        timestep: int = 500,
        num_timesteps: int = 1000,
        beta_range: tuple[float, float] = (1e-5, 5e-3),
        p: float = 1.0,
        same_on_batch: bool = False,
        keepdim: bool = False,
    ) -> None:
        if (
            isinstance(num_timesteps, bool)
            or not isinstance(num_timesteps, int)
            or num_timesteps < 1
        ):
            raise ValueError(
                f"num_timesteps must be a positive int, got {num_timesteps!r}; NoisyRollout "
                "uses 1000."
            )
        low, high = (float(v) for v in beta_range)
        if not 0.0 <= low <= high < 1.0:
            raise ValueError(
                f"beta_range must satisfy 0 <= low <= high < 1, got {beta_range!r}; "
                "NoisyRollout uses (1e-5, 5e-3)."
            )
        p = _check_probability(p, "p")
        super().__init__(p=p, same_on_batch=same_on_batch, keepdim=keepdim)
        self.num_timesteps = num_timesteps
        self.beta_range = (low, high)
        self._param_generator = _DiffusionNoiseGenerator(0)
        self.timestep = timestep  # validated by the setter
        alpha_bar = diffusion_alpha_bar(num_timesteps, self.beta_range)  # [T]
        self.register_buffer("alpha_bar", alpha_bar, persistent=False)

    def _generator(self) -> _DiffusionNoiseGenerator:
        generator = self._param_generator
        assert isinstance(generator, _DiffusionNoiseGenerator)
        return generator

    @property
    def timestep(self) -> int:
        """The diffusion timestep the next draw uses."""
        return self._generator().timestep

    @timestep.setter
    def timestep(self, value: int) -> None:
        num = self.num_timesteps
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < num:
            raise ValueError(
                f"timestep must be an int in [0, {num}), got {value!r}; NoisyRollout starts "
                "at 500 and anneals it with noise_timestep()."
            )
        self._generator().timestep = value

    def apply_transform(
        self,
        input: Tensor,
        params: dict[str, Tensor],
        flags: dict[str, Any],
        transform: Tensor | None = None,
    ) -> Tensor:
        batch_size = input.shape[0]
        if batch_size == 0:
            return input.clone()
        device = input.device
        steps = params["timestep"].to(device=self.alpha_bar.device).long()  # (B,)
        if bool((steps < 0).any()) or bool((steps >= self.num_timesteps).any()):
            raise ValueError(
                f"DiffusionNoise params hold timesteps {steps.tolist()} outside "
                f"[0, {self.num_timesteps}); replay params only with a module of the same schedule."
            )
        alpha_bar = self.alpha_bar[steps].to(device=device, dtype=torch.float32)  # (B,)
        signal = alpha_bar.sqrt().view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        spread = (1.0 - alpha_bar).sqrt().view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        noise = torch.empty(input.shape, dtype=torch.float32, device=device)
        for index, seed in enumerate(params["noise_seed"].tolist()):
            generator = torch.Generator(device=device)
            generator.manual_seed(int(seed))
            noise[index] = torch.randn(
                input.shape[1:], generator=generator, device=device, dtype=torch.float32
            )
        noisy = signal * input.to(torch.float32) + spread * noise  # (B, C, H, W)
        return noisy.clamp(0.0, 1.0).to(input.dtype)
