"""Unit tests for PAPO's implicit perception loss (spec §5)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from cppo_lightning.losses import implicit_perception_loss, kl_estimate

LN2 = math.log(2.0)


def close(actual: torch.Tensor, expected, *, atol: float = 1e-6) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0.0)


def test_by_hand():
    # k3 with d = logp_masked - logp:
    #   token 0: ln 0.25 - ln 0.5 = -ln2 -> 0.5 + ln2 - 1 = 0.193147;
    #   token 1: ln 0.5 - ln 0.25 = +ln2 -> 2 - ln2 - 1 = 0.306853;
    #   token 2: padding (-inf), ignored.
    # token-mean KL = (0.193147 + 0.306853) / 2 = 0.25 -> loss = -0.25.
    logp = torch.tensor([[math.log(0.5), math.log(0.25), -math.inf]], requires_grad=True)
    masked = torch.tensor([[math.log(0.25), math.log(0.5), -math.inf]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0]])
    loss, stats = implicit_perception_loss(logp, masked, mask)
    close(loss, -0.25, atol=1e-6)
    close(stats["kl_prcp"], 0.25, atol=1e-6)
    assert not stats["kl_prcp"].requires_grad
    loss.backward()
    for t in (logp, masked):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad[0, 2] == 0
    # k1 = logp - logp_masked = [ln2, -ln2] -> mean 0 -> loss 0.
    close(implicit_perception_loss(logp, masked, mask, kind="k1")[0], 0.0, atol=1e-6)


def test_loss_decreases_as_the_masked_view_moves_away():
    logp = torch.tensor([[-0.5, -1.0, -2.0]])
    mask = torch.ones(1, 3)
    losses = [
        implicit_perception_loss(logp, logp - delta, mask)[0].item()
        for delta in (0.0, 0.5, 1.0, 2.0, 4.0)
    ]
    assert losses[0] == 0.0  # identical views: no KL
    assert all(a > b for a, b in itertools.pairwise(losses))
    # A gradient step on the masked branch pushes it further from the original view.
    masked = (logp - 0.5).requires_grad_()
    loss, _ = implicit_perception_loss(logp, masked, mask)
    loss.backward()
    assert masked.grad is not None
    stepped = (masked - 0.1 * masked.grad).detach()
    assert implicit_perception_loss(logp, stepped, mask)[0] < loss


def test_unbounded_but_for_the_k3_clamp_and_all_tokens_count():
    # d = -30 -> clamped to -20 -> e^-20 + 19 -> clamped to 10 per token.
    logp = torch.zeros(2, 2)
    loss, stats = implicit_perception_loss(logp, logp - 30.0, torch.ones(2, 2))
    close(loss, -10.0)
    # Every valid token of every rollout counts, whatever its advantage: the same as
    # aggregating kl_estimate over the whole response mask.
    gen = torch.Generator().manual_seed(0)
    a, b = -torch.rand(3, 4, generator=gen), -torch.rand(3, 4, generator=gen)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    loss, stats = implicit_perception_loss(a, b, mask)
    k3 = kl_estimate(a, b, kind="k3")
    close(loss, -(k3 * mask).sum() / mask.sum(), atol=1e-6)
    close(stats["kl_prcp"], -loss)


def test_aggregation_options_pass_through():
    # Per-token KL (k1 = logp - logp_masked) = [[1, 2], [3, *]] with the last token padding:
    # seq-mean-token-mean = (1.5 + 3) / 2 = 2.25; seq-sum-constant(4) = 6 / (2 * 4) = 0.75.
    logp = torch.zeros(2, 2)
    masked = -torch.tensor([[1.0, 2.0], [3.0, 99.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, _ = implicit_perception_loss(logp, masked, mask, kind="k1", agg="seq-mean-token-mean")
    close(loss, -2.25)
    loss, _ = implicit_perception_loss(
        logp, masked, mask, kind="k1", agg="seq-sum-constant", agg_constant=4
    )
    close(loss, -0.75)


def test_errors():
    with pytest.raises(ValueError, match="kind must be one of"):
        implicit_perception_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), kind="x")
    with pytest.raises(ValueError, match="same shape"):
        implicit_perception_loss(torch.zeros(1, 2), torch.zeros(1, 3), torch.ones(1, 2))
    with pytest.raises(ValueError, match="needs constant="):
        implicit_perception_loss(
            torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), agg="seq-sum-constant"
        )
