"""NoisyRollout (arXiv 2504.13055): part of each group sampled from a noise-distorted image, at
the ``rollout.view`` seam.

Every prompt's G responses form one group as usual; the first ``G - num_noisy`` are sampled from
the clean image, the last ``num_noisy`` from the image after
:class:`~cppo_lightning.perturbations.DiffusionNoise` at a timestep that anneals over training
(:func:`~cppo_lightning.perturbations.noise.noise_timestep`). Rewards, advantages and every
log-prob of the update use the clean image: only generation sees the noise. The overlay
``configs/experiments/noisyrollout.yaml`` turns the method on; the sources are
``docs/methods-sources.md`` ("NoisyRollout").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from cppo_lightning.perturbations import apply_seeded, view_seed
from cppo_lightning.perturbations.noise import DECAY_MODES, DiffusionNoise, noise_timestep
from cppo_lightning.seams import GenerationGroup, RolloutView

if TYPE_CHECKING:
    from cppo_lightning.records import PromptBatch, RolloutBatch

__all__ = ["NoisyRollout"]

#: Names of the parts, in order (``RolloutBatch.generated_from`` 0 and 1).
PARTS = ("clean", "noisy")


class NoisyRollout(RolloutView):
    """Sample ``num_noisy`` responses of each group from the noisy image, the rest from the clean.

    The noise of an image is drawn from ``(seed, dataset row, step, image)`` alone
    (:func:`~cppo_lightning.perturbations.apply_seeded`), on the batch's device, so a resumed
    run distorts its images exactly as the uninterrupted run did and the training RNG is
    untouched; ``step`` and the run's length come from the trainer, so the annealing resumes
    with it.

    Defaults and where they come from (the authors' code ``John-AI-Lab/NoisyRollout``;
    ``docs/methods-sources.md``):

    - ``num_noisy = None``: half the group, rounded down; the authors sample 6 clean + 6 noisy
      responses per prompt as one group of 12 (``rollout.n = 6`` twice, one ``uid``); the
      base config's G = 8 gives 4 + 4.
    - ``initial_timestep = 500``: ``gaussian_noise_step`` of the Geo3K script (450 for K12).
    - ``decay = "sigmoid"``, ``decay_coef = 30``, ``decay_midpoint = 40``: the Geo3K script
      (``decay_mode=sigmoid``, ``decay_coef=30``, 60 for K12; ``decay_sig_mid_step=40``),
      ``t = int(initial_timestep * (1 - sigmoid(coef * (step - midpoint) / total)))`` with
      ``step`` the 1-based rollout batch and ``total`` the run's rollout batches.
    - ``noise = None``: ``DiffusionNoise()``, the authors' 1000-step sigmoid beta schedule in
      ``[1e-5, 5e-3]``; its ``timestep`` is set by the schedule before every draw.

    Where this differs from the authors' code: the step counts rollout batches
    (``trainer.global_step`` / optimizer steps per rollout batch, + 1), which is the authors'
    ``global_step`` when one rollout batch makes one update; the midpoint of 40 steps is theirs
    and not rescaled to the run's length. The noise is drawn per image from a seed (theirs
    from the process's RNG).

    Logs (via :meth:`stats`): ``rollout/noise_timestep``, ``rollout/reward_mean_clean`` and
    ``rollout/reward_mean_noisy`` (the mean reward, against the clean image, of the responses
    sampled from each).

    Args:
        num_noisy: Responses per group sampled from the noisy image (``1 .. G - 1``); half
            the group when None.
        initial_timestep: The diffusion timestep at the start (the noise strength alpha_0).
        decay: How it anneals: one of ``sigmoid``, ``linear``, ``pow``, ``exp``, ``constant``.
        decay_coef: The decay's coefficient (the sigmoid's steepness over the run).
        decay_midpoint: The sigmoid's midpoint, in rollout batches.
        noise: The distortion (a kornia module with a ``timestep``);
            :class:`~cppo_lightning.perturbations.DiffusionNoise` when None.
        seed: Base seed of the noise draws.
    """

    def __init__(
        self,
        num_noisy: int | None = None,
        initial_timestep: int = 500,
        decay: str = "sigmoid",
        decay_coef: float = 30.0,
        decay_midpoint: float = 40.0,
        noise: DiffusionNoise | None = None,
        seed: int = 0,
    ) -> None:
        if num_noisy is not None and (
            isinstance(num_noisy, bool) or not isinstance(num_noisy, int) or num_noisy < 1
        ):
            raise ValueError(
                f"rollout.view.num_noisy must be an int >= 1 or null (half the group), got "
                f"{num_noisy!r}."
            )
        if decay not in DECAY_MODES:
            raise ValueError(f"rollout.view.decay must be one of {DECAY_MODES}, got {decay!r}.")
        self.noise = noise if noise is not None else DiffusionNoise()
        limit = int(getattr(self.noise, "num_timesteps", 1000))
        if isinstance(initial_timestep, bool) or not 0 <= initial_timestep < limit:
            raise ValueError(
                f"rollout.view.initial_timestep must be an int in [0, {limit}) (the noise's "
                f"schedule), got {initial_timestep!r}; the authors start at 500."
            )
        self.num_noisy = num_noisy
        self.initial_timestep = initial_timestep
        self.decay = decay
        self.decay_coef = decay_coef
        self.decay_midpoint = decay_midpoint
        self.seed = seed
        #: The timestep of the last :meth:`parts` call (logged as ``rollout/noise_timestep``).
        self.timestep: int | None = None

    def noisy_count(self, group_size: int) -> int:
        """Responses per group sampled from the noisy image."""
        count = group_size // 2 if self.num_noisy is None else self.num_noisy
        if not 1 <= count < group_size:
            raise ValueError(
                f"rollout.view.num_noisy={count} leaves no clean or no noisy response in a group "
                f"of rollout.group_size={group_size}: set it in [1, {group_size - 1}]."
            )
        return count

    def timestep_at(self, step: int, total_steps: int) -> int:
        """The diffusion timestep of rollout batch ``step`` (1-based) of ``total_steps``."""
        return noise_timestep(
            step,
            total_steps,
            initial=self.initial_timestep,
            mode=self.decay,
            coef=self.decay_coef,
            midpoint=self.decay_midpoint,
        )

    def parts(
        self,
        prompts: PromptBatch,
        group_size: int,
        step: int,
        total_steps: int,
        encode: Callable[[Sequence[torch.Tensor]], dict[str, Tensor]],
    ) -> list[GenerationGroup]:
        noisy_count = self.noisy_count(group_size)
        if prompts.images is None or prompts.row_index is None:
            raise ValueError(
                "NoisyRollout needs the batch's images and dataset rows: the rollout callback "
                "asks the DataModule to carry them (VisionLanguageDataModule.carry_images)."
            )
        self.timestep = self.timestep_at(step, total_steps)
        self.noise.timestep = self.timestep
        self.noise.to(prompts.images[0].device)
        noisy = [
            apply_seeded(self.noise, image, view_seed(self.seed, row, step, key))
            for image, (row, key) in zip(prompts.images, _image_keys(prompts), strict=True)
        ]
        return [
            GenerationGroup(group_size - noisy_count, None),
            GenerationGroup(noisy_count, encode(noisy)),
        ]

    def stats(self, rollout: RolloutBatch) -> dict[str, float]:
        """``noise_timestep`` and the mean reward of the responses of each part (logged under
        ``rollout/``)."""
        metrics = {"noise_timestep": float(self.timestep if self.timestep is not None else 0)}
        rewards = rollout.rewards.float()
        for part, name in enumerate(PARTS):
            chosen = rollout.generated_from == part if rollout.generated_from is not None else None
            metrics[f"reward_mean_{name}"] = (
                float(rewards[chosen].mean())
                if chosen is not None and bool(chosen.any())
                else math.nan
            )
        return metrics


def _image_keys(prompts: PromptBatch) -> list[tuple[int, str]]:
    """(dataset row, stream) of every image: the k-th image of a row (k > 0) gets ``noisy#k``."""
    assert prompts.row_index is not None
    keys = []
    rows = prompts.row_index.tolist()
    for row, count in zip(rows, prompts.image_counts.tolist(), strict=True):
        keys += [(int(row), "noisy" if k == 0 else f"noisy#{k}") for k in range(count)]
    return keys
