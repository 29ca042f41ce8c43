"""Unit tests for GSPO's sequence-level ratio loss (arXiv 2507.18071)."""

from __future__ import annotations

import math

import pytest
import torch

from cppo_lightning.losses.gspo import sequence_log_ratio, sequence_ratio_loss

E01 = math.exp(0.1)  # 1.105171
EM01 = math.exp(-0.1)  # 0.904837


def close(actual: torch.Tensor, expected, *, atol: float = 1e-6) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0.0)


def two_responses(dtype=torch.float64):
    # Row 0: logp - old = [0.3, -0.1, pad] -> mean 0.1 -> s0 = e^0.1.
    # Row 1: logp - old = [-0.2, 0.0, -0.1] -> mean -0.1 -> s1 = e^-0.1.
    old = torch.tensor([[-1.0, -2.0, -math.inf], [-0.5, -1.5, -0.7]], dtype=dtype)
    delta = torch.tensor([[0.3, -0.1, 0.0], [-0.2, 0.0, -0.1]], dtype=dtype)
    logp = (old + delta).requires_grad_()
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv = torch.tensor([1.0, -1.0], dtype=dtype)
    return logp, old, adv, mask


def test_sequence_log_ratio_by_hand():
    logp, old, _, mask = two_responses()
    close(sequence_log_ratio(logp, old, mask), [0.1, -0.1], atol=1e-12)
    # No valid token: ratio 1 (log 0), not NaN.
    empty = torch.zeros(1, 3)
    close(sequence_log_ratio(empty, empty, empty), [0.0])


def test_wide_clip_by_hand():
    # clip range 0.2 both ways: neither ratio is clipped.
    #   l0 = -A0 * s0 = -1.105171 ; l1 = max(-A1 * s1, -A1 * clip(s1)) = 0.904837.
    # seq-mean-token-mean: (-1.105171 + 0.904837) / 2 = -0.100167.
    # token-mean: (2 * -1.105171 + 3 * 0.904837) / 5 = 0.100834.
    logp, old, adv, mask = two_responses()
    loss, stats = sequence_ratio_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.2)
    close(loss, (-E01 + EM01) / 2)
    close(stats["ratio_mean"], (E01 + EM01) / 2)
    close(stats["ratio_min"], EM01)
    close(stats["ratio_max"], E01)
    close(stats["clip_frac"], 0.0)
    close(stats["seq_clip_frac"], 0.0)
    # approx_kl = token mean of old - logp = -(0.3 - 0.1 - 0.2 + 0 - 0.1) / 5 = 0.02.
    close(stats["approx_kl"], 0.02, atol=1e-12)
    assert all(not v.requires_grad for v in stats.values())

    # Gradient, seq-mean over 2 responses: d/dlogp_t = (1/2) * (-A_i * s_i / |y_i|):
    #   row 0: -e^0.1 / 4 = -0.276293 at its two tokens; row 1: e^-0.1 / 6 = 0.150806.
    loss.backward()
    assert logp.grad is not None
    close(logp.grad, [[-E01 / 4, -E01 / 4, 0.0], [EM01 / 6] * 3])

    token_loss, _ = sequence_ratio_loss(
        logp, old, adv, mask, clip_low=0.2, clip_high=0.2, agg="token-mean"
    )
    close(token_loss, (-2 * E01 + 3 * EM01) / 5)


def test_paper_clip_range_by_hand():
    # clip (3e-4, 4e-4): s0 = 1.105 > 1.0004 and A0 > 0 -> l0 = -1.0004 (clipped);
    # s1 = 0.905 < 0.9997 and A1 < 0 -> l1 = max(0.904837, 0.9997) = 0.9997 (clipped).
    # seq-mean = (-1.0004 + 0.9997) / 2 = -0.00035; no gradient anywhere.
    logp, old, adv, mask = two_responses()
    loss, stats = sequence_ratio_loss(logp, old, adv, mask)
    close(loss, (-1.0004 + 0.9997) / 2, atol=1e-12)
    close(stats["clip_frac"], 1.0)
    close(stats["seq_clip_frac"], 1.0)
    loss.backward()
    assert logp.grad is not None
    close(logp.grad, torch.zeros_like(logp))


def test_on_policy_ratio_is_one_and_gradient_is_the_sequence_mean():
    # logp == old: s = 1 for every response; loss = -mean_i(A_i); d/dlogp_t = -A_i / (N |y_i|).
    old = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.5, -0.7]], dtype=torch.float64)
    logp = old.clone().requires_grad_()
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    adv = torch.tensor([2.0, -1.0], dtype=torch.float64)
    loss, stats = sequence_ratio_loss(logp, old, adv, mask)
    close(loss, -(2.0 - 1.0) / 2)
    close(stats["ratio_mean"], 1.0)
    loss.backward()
    assert logp.grad is not None
    close(logp.grad, [[-2.0 / 6] * 3, [1.0 / 2, 0.0, 0.0]])


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean"])
@pytest.mark.parametrize("clip", [(0.2, 0.28), (3e-4, 4e-4), (0.02, 0.02)])
def test_gspo_token_with_sequence_advantages_equals_gspo(agg, clip):
    # The paper: GSPO-token with A_it = A_i is GSPO in value and gradient.
    generator = torch.Generator().manual_seed(0)
    n, length = 6, 7
    old = -torch.rand(n, length, generator=generator, dtype=torch.float64) * 3
    delta = (torch.rand(n, length, generator=generator, dtype=torch.float64) - 0.5) * 0.1
    mask = torch.ones(n, length, dtype=torch.long)
    for row, valid in enumerate([7, 5, 3, 1, 6, 0]):
        mask[row, valid:] = 0
    old = torch.where(mask.bool(), old, torch.full_like(old, -math.inf))  # padding = -inf
    adv = torch.randn(n, generator=generator, dtype=torch.float64)

    results = []
    for token_level, advantages in (
        (False, adv),
        (True, adv),
        (True, adv[:, None].expand(n, length)),
    ):
        logp = (old.nan_to_num(neginf=-5.0) + delta).requires_grad_()
        loss, stats = sequence_ratio_loss(
            logp,
            old,
            advantages,
            mask,
            clip_low=clip[0],
            clip_high=clip[1],
            token_level=token_level,
            agg=agg,
        )
        loss.backward()
        assert logp.grad is not None and torch.isfinite(logp.grad).all()
        results.append((loss.detach(), logp.grad.clone(), stats))
    for loss, grad, stats in results[1:]:
        close(loss, results[0][0], atol=1e-12)
        close(grad, results[0][1], atol=1e-12)
        for key in ("clip_frac", "seq_clip_frac", "ratio_mean"):
            close(stats[key], results[0][2][key], atol=1e-12)


def test_gspo_token_with_token_advantages_by_hand():
    # One response, two tokens, logp - old = [0.2, 0.0] -> s = e^0.1; A = [1, -1]; wide clip.
    # l = [-e^0.1, +e^0.1] -> seq-mean-token-mean = 0; d/dlogp_t = -A_t * s / 2.
    old = torch.tensor([[-1.0, -1.0]], dtype=torch.float64)
    logp = (old + torch.tensor([[0.2, 0.0]], dtype=torch.float64)).requires_grad_()
    adv = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    loss, _ = sequence_ratio_loss(
        logp, old, adv, torch.ones(1, 2), clip_low=0.2, clip_high=0.2, token_level=True
    )
    close(loss, 0.0, atol=1e-12)
    loss.backward()
    assert logp.grad is not None
    close(logp.grad, [[-E01 / 2, E01 / 2]])


def test_dual_clip_caps_negative_advantages():
    # s = e^2 (logp - old = 2 at the single token), A = -1: unclipped l = e^2 = 7.389 > 3 -> 3.
    old = torch.zeros(1, 1, dtype=torch.float64)
    logp = torch.full((1, 1), 2.0, dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([-1.0], dtype=torch.float64)
    off, _ = sequence_ratio_loss(logp, old, adv, torch.ones(1, 1))
    close(off, math.exp(2.0))
    on, stats = sequence_ratio_loss(logp, old, adv, torch.ones(1, 1), dual_clip=3.0)
    close(on, 3.0)
    close(stats["dual_clip_frac"], 1.0)
    on.backward()
    assert logp.grad is not None
    close(logp.grad, [[0.0]])


def test_empty_batch_and_padding_are_finite():
    logp = torch.full((2, 3), -math.inf, requires_grad=True)
    mask = torch.zeros(2, 3)
    for token_level in (False, True):
        loss, stats = sequence_ratio_loss(
            logp, logp.detach(), torch.ones(2), mask, token_level=token_level
        )
        assert loss.item() == 0.0
        assert all(torch.isfinite(v) for v in stats.values())
        loss.backward()
        assert logp.grad is not None and torch.isfinite(logp.grad).all()


def test_refuses_bad_inputs():
    logp = torch.zeros(2, 3)
    mask = torch.ones(2, 3)
    with pytest.raises(ValueError, match="token_level=True"):
        sequence_ratio_loss(logp, logp, torch.zeros(2, 3), mask)
    with pytest.raises(ValueError, match="advantages must be"):
        sequence_ratio_loss(logp, logp, torch.zeros(3), mask)
    with pytest.raises(ValueError, match="same shape"):
        sequence_ratio_loss(logp, logp[:, :2], torch.zeros(2), mask)
    with pytest.raises(ValueError, match="clip_low"):
        sequence_ratio_loss(logp, logp, torch.zeros(2), mask, clip_low=1.0)
    with pytest.raises(ValueError, match="agg"):
        sequence_ratio_loss(logp, logp, torch.zeros(2), mask, agg="nope")
