"""Unit tests for NoisyRollout's annealed diffusion noise (arXiv 2504.13055)."""

from __future__ import annotations

import math

import pytest
import torch

from cppo_lightning.perturbations import apply_seeded
from cppo_lightning.perturbations.noise import (
    DiffusionNoise,
    diffusion_alpha_bar,
    noise_decay,
    noise_timestep,
    noisy_rows,
)


def test_alpha_bar_by_hand():
    # beta_0 = sigmoid(-6) * (5e-3 - 1e-5) + 1e-5 = 0.00247262 * 0.00499 + 1e-5 = 2.23384e-5
    # -> abar_0 = 1 - 2.23384e-5; the schedule decreases; abar_500 ~ 0.863^2 = 0.7448.
    alpha_bar = diffusion_alpha_bar()
    assert alpha_bar.shape == (1000,) and alpha_bar.dtype == torch.float32
    sig = 1.0 / (1.0 + math.exp(6.0))
    assert alpha_bar[0].item() == pytest.approx(1 - (sig * (5e-3 - 1e-5) + 1e-5), abs=1e-7)
    assert torch.all(alpha_bar[1:] < alpha_bar[:-1])
    assert alpha_bar[500].sqrt().item() == pytest.approx(0.8630, abs=1e-4)
    assert (1 - alpha_bar[500]).sqrt().item() == pytest.approx(0.5052, abs=1e-4)


def test_noise_decay_by_hand():
    # sigmoid: 1 - sigmoid(30 * (step - 40) / 100); at the midpoint 0.5, at 0 sigmoid(12).
    assert noise_decay(40, 100) == pytest.approx(0.5)
    assert noise_decay(0, 100) == pytest.approx(1 / (1 + math.exp(-12)))
    assert noise_decay(100, 100) == pytest.approx(1 / (1 + math.exp(18)))
    assert noise_decay(10**9, 100) == 0.0  # stays finite far past the end
    assert noise_decay(25, 100, mode="linear") == pytest.approx(0.75)
    assert noise_decay(25, 100, mode="pow", coef=2.0) == pytest.approx(1 - 0.25**2)
    assert noise_decay(8, 10, mode="exp", coef=0.5) == pytest.approx(1 - 0.5**2)
    assert noise_decay(8, 10, mode="constant") == 1.0
    with pytest.raises(ValueError, match="mode"):
        noise_decay(1, 10, mode="cosine")
    with pytest.raises(ValueError, match="total_steps"):
        noise_decay(1, 0)


def test_noise_timestep_by_hand():
    # int(500 * decay), truncated: 499 at the start (decay 0.999994), 250 at the midpoint, 0 late.
    assert noise_timestep(0, 100) == 499
    assert noise_timestep(40, 100) == 250
    assert noise_timestep(100, 100) == 0
    assert noise_timestep(0, 100, initial=450, coef=60.0) == 449
    assert noise_timestep(5, 10, mode="constant", initial=7) == 7
    with pytest.raises(ValueError, match="initial"):
        noise_timestep(0, 10, initial=-1)


def test_noisy_rows_layout():
    # The authors' layout: per prompt n clean then n noisy.
    assert noisy_rows(2, 4, 2).tolist() == [False, False, True, True] * 2
    assert noisy_rows(1, 3, 0).tolist() == [False] * 3
    with pytest.raises(ValueError, match="num_noisy"):
        noisy_rows(1, 3, 4)


def test_diffusion_noise_by_hand():
    # x_t = clamp(sqrt(abar_t) x + sqrt(1 - abar_t) eps, 0, 1), eps from the drawn seed.
    images = torch.rand(2, 3, 6, 5, generator=torch.Generator().manual_seed(0))
    noise = DiffusionNoise(timestep=500)
    out = noise(images)
    alpha_bar = diffusion_alpha_bar()[500]
    for index, seed in enumerate(noise._params["noise_seed"].tolist()):
        eps = torch.randn(3, 6, 5, generator=torch.Generator().manual_seed(int(seed)))
        expected = (alpha_bar.sqrt() * images[index] + (1 - alpha_bar).sqrt() * eps).clamp(0, 1)
        torch.testing.assert_close(out[index], expected)
    assert noise._params["timestep"].tolist() == [500, 500]


def test_diffusion_noise_statistics_at_a_mild_step():
    # t = 100: scale 0.99829, noise std 0.0584; on a flat 0.5 image nothing is clamped.
    flat = torch.full((1, 3, 64, 64), 0.5)
    out = apply_seeded(DiffusionNoise(timestep=100), flat, seed=7)
    residual = out - 0.99829 * 0.5
    assert residual.mean().abs().item() < 0.003
    assert residual.std().item() == pytest.approx(0.0584, rel=0.05)


def test_diffusion_noise_replay_seed_and_schedule():
    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    noise = DiffusionNoise(timestep=300, keepdim=True)
    first = noise(images)
    params = noise._params
    noise.timestep = 10  # the schedule moved on; the recorded params still replay t = 300
    torch.testing.assert_close(noise(images, params=params), first, rtol=0, atol=0)
    a = apply_seeded(noise, images, seed=5)
    b = apply_seeded(noise, images, seed=5)
    c = apply_seeded(noise, images, seed=6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == images.shape and a.min() >= 0 and a.max() <= 1
    # Weaker noise stays closer to the clean image.
    strong = apply_seeded(DiffusionNoise(timestep=900), images, seed=5)
    assert (strong - images).abs().mean() > (a - images).abs().mean()


def test_diffusion_noise_same_on_batch_and_p():
    image = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(2)).expand(4, -1, -1, -1)
    shared = apply_seeded(DiffusionNoise(same_on_batch=True), image.contiguous(), seed=0)
    assert all(torch.equal(shared[0], shared[i]) for i in range(4))
    untouched = apply_seeded(DiffusionNoise(p=0.0), image.contiguous(), seed=0)
    assert torch.equal(untouched, image)
    unbatched = DiffusionNoise(keepdim=True)(image[0])
    assert unbatched.shape == image[0].shape


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"timestep": 1000}, "timestep"),
        ({"timestep": -1}, "timestep"),
        ({"timestep": 2.5}, "timestep"),
        ({"num_timesteps": 0}, "num_timesteps"),
        ({"beta_range": (0.1, 0.01)}, "beta_range"),
        ({"p": 2.0}, "p must be"),
    ],
)
def test_diffusion_noise_refuses_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiffusionNoise(**kwargs)
