"""Unit tests for VPPO's visual dependency, token mask and advantage shaping (arXiv 2510.09285)."""

from __future__ import annotations

import math

import pytest
import torch

from cppo_lightning.losses import kl_estimate
from cppo_lightning.losses.vppo import (
    trajectory_dependency,
    visual_dependency,
    vppo_advantage_scale,
    vppo_token_mask,
)

LN2 = math.log(2.0)


def close(actual: torch.Tensor, expected, *, atol: float = 1e-6) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0.0)


def test_visual_dependency_by_hand():
    # d = logp_masked - logp:
    #   ln .25 - ln .5 = -ln2 -> e^-ln2 + ln2 - 1 = 0.5 + 0.693147 - 1 = 0.193147
    #   ln .5 - ln .25 = +ln2 -> 2 - ln2 - 1 = 0.306853
    #   equal -> 0;  d = -30 -> clamped to -20 -> e^-20 + 19 -> clamped to 10.
    logp = torch.tensor([[math.log(0.5), math.log(0.25), -1.0, 0.0]], requires_grad=True)
    masked = torch.tensor([[math.log(0.25), math.log(0.5), -1.0, -30.0]])
    dep = visual_dependency(logp, masked)
    close(dep, [[0.5 + LN2 - 1, 2 - LN2 - 1, 0.0, 10.0]])
    assert not dep.requires_grad
    # The same estimator as the project's k3 KL with the masked view as the reference.
    close(dep[:, :3], kl_estimate(logp, masked, "k3")[:, :3].detach())


def test_visual_dependency_padding_is_finite():
    logp = torch.tensor([[-math.inf, -1.0]])
    masked = torch.tensor([[-math.inf, -math.inf]])
    dep = visual_dependency(logp, masked)
    assert torch.isfinite(dep).all()
    with pytest.raises(ValueError, match="same shape"):
        visual_dependency(logp, masked[:, :1])


def test_vppo_token_mask_by_hand():
    # Row 0: 4 valid tokens, top 0.4 -> k = ceil(1.6) = 2 -> 0.5 and 0.3; padding 0.9 never.
    # Row 1: 1 valid token -> k = ceil(0.4) = 1. Row 2: no valid token -> nothing.
    dep = torch.tensor([[0.1, 0.5, 0.3, 0.2, 0.9], [0.0, 0.7, 0.0, 0.0, 0.0], [1.0] * 5])
    mask = torch.tensor([[1, 1, 1, 1, 0], [0, 1, 0, 0, 0], [0] * 5])
    selected = vppo_token_mask(dep, mask)
    assert selected.tolist() == [
        [False, True, True, False, False],
        [False, True, False, False, False],
        [False] * 5,
    ]
    # top 1.0 keeps every valid token.
    assert vppo_token_mask(dep, mask, 1.0).tolist() == mask.bool().tolist()
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="top_fraction"):
            vppo_token_mask(dep, mask, bad)


def test_trajectory_dependency_by_hand():
    # (0.1 + 0.5 + 0.3 + 0.2) / 4 = 0.275; a response without tokens scores 0.
    dep = torch.tensor([[0.1, 0.5, 0.3, 0.2, 0.9], [1.0] * 5])
    mask = torch.tensor([[1, 1, 1, 1, 0], [0] * 5])
    close(trajectory_dependency(dep, mask), [0.275, 0.0])


def test_advantage_scale_by_hand_own_bounds():
    # Valid scores [0.1, 0.3, 0.5] -> low 0.1, high 0.5 -> u = [0, 0.5, 1], mu = 0.5,
    # top = 0.9 + 0.1 / 0.5 = 1.1 -> scale = [0.9, 1.0, 1.1]; the invalid row keeps 1.
    scores = torch.tensor([0.1, 0.3, 0.5, 0.2], dtype=torch.float64)
    valid = torch.tensor([True, True, True, False])
    scale, stats = vppo_advantage_scale(scores, valid=valid)
    close(scale, [0.9, 1.0, 1.1, 1.0])
    close(stats["scale_max"], 1.1)
    close(stats["score_low"], 0.1)
    close(stats["score_high"], 0.5)
    close(stats["score_mean"], 0.3)
    close(scale[valid].mean(), 1.0)  # the scales of the scored rows average to 1


def test_advantage_scale_by_hand_mini_batch_bounds():
    # Micro-batch [0.1, 0.3] inside a mini-batch range (0, 1): u = [0.1, 0.3], mu = 0.2,
    # top = 0.9 + 0.1 / 0.2 = 1.4 -> scale = 0.9 + u * 0.5 = [0.95, 1.05].
    scale, stats = vppo_advantage_scale(
        torch.tensor([0.1, 0.3], dtype=torch.float64), bounds=(0.0, 1.0)
    )
    close(scale, [0.95, 1.05])
    close(stats["scale_max"], 1.4)
    # Scores outside the bounds are clamped to u in [0, 1]: u = [0, 1], mu = 0.5, top = 1.1.
    scale, _ = vppo_advantage_scale(
        torch.tensor([-1.0, 2.0], dtype=torch.float64), scale_min=0.9, bounds=(0.0, 1.0)
    )
    close(scale, [0.9, 1.1])


def test_advantage_scale_guards():
    # One scored row and no bounds: no range, every scale 1.
    scale, stats = vppo_advantage_scale(torch.tensor([0.4]))
    close(scale, [1.0])
    close(stats["scale_max"], 1.0)
    # A range at or below 1e-6: every scale 1.
    scale, _ = vppo_advantage_scale(torch.tensor([0.4, 0.4 + 5e-7], dtype=torch.float64))
    close(scale, [1.0, 1.0])
    # Every row at the bottom of the mini-batch range (mu = 0): every scale is scale_min.
    scale, _ = vppo_advantage_scale(torch.tensor([0.1, 0.1]), scale_min=0.8, bounds=(0.1, 0.5))
    close(scale, [0.8, 0.8])
    # scale_min = 1 turns shaping off.
    scale, _ = vppo_advantage_scale(torch.tensor([0.1, 0.9]), scale_min=1.0)
    close(scale, [1.0, 1.0])
    with pytest.raises(ValueError, match="scale_min"):
        vppo_advantage_scale(torch.tensor([0.1, 0.9]), scale_min=1.5)
    with pytest.raises(ValueError, match="valid"):
        vppo_advantage_scale(torch.tensor([0.1, 0.9]), valid=torch.tensor([True]))


def test_advantage_scale_orders_by_dependency_and_keeps_mean():
    generator = torch.Generator().manual_seed(3)
    scores = torch.rand(16, generator=generator, dtype=torch.float64)
    scale, _ = vppo_advantage_scale(scores, scale_min=0.9)
    order = scores.argsort()
    assert torch.all(scale[order][1:] >= scale[order][:-1])
    close(scale.mean(), 1.0, atol=1e-7)
    close(scale.min(), 0.9)
