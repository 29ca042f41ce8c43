"""GSPO's component (:class:`cppo_lightning.methods.SequenceRatio`) against the formula by hand.

``s_i = exp(mean_t(logp - old_logp))`` over response i's valid tokens, clipped per response to
``[1 - 3e-4, 1 + 4e-4]``; ``l_i = max(-A_i s_i, -A_i clip(s_i))``; seq-mean-token-mean over the
responses. GSPO-token has the same value; its gradient reaches each token with ``s_i`` itself.
"""

from __future__ import annotations

import math

import pytest
import torch

from cppo_lightning.methods import SequenceRatio
from cppo_lightning.seams import PolicyLoss

S0 = math.exp(3e-4)  # 1.00030005: inside [0.9997, 1.0004]
S1 = math.exp(1e-3)  # 1.00100050: above 1.0004
S2 = math.exp(-1e-3)  # 0.99900050: below 0.9997


def close(actual: torch.Tensor, expected, *, atol: float = 1e-9) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0.0)


def three_responses():  # type: ignore[no-untyped-def]
    """float64; padding holds -inf in old_logp, which must not leak in.

    Row 0: logp - old = [2e-4, 4e-4, pad]  -> mean 3e-4   -> s0 = e^3e-4,  A0 = +1
    Row 1: logp - old = [1e-3, 1e-3, 1e-3] -> mean 1e-3   -> s1 = e^1e-3,  A1 = +2
    Row 2: logp - old = [-1e-3, pad, pad]  -> mean -1e-3  -> s2 = e^-1e-3, A2 = -1
    """
    old = torch.tensor(
        [[-1.0, -2.0, -math.inf], [-0.5, -1.5, -0.7], [-0.3, -math.inf, -math.inf]],
        dtype=torch.float64,
    )
    delta = torch.tensor([[2e-4, 4e-4, 0.0], [1e-3, 1e-3, 1e-3], [-1e-3, 0.0, 0.0]])
    logp = torch.where(torch.isinf(old), torch.zeros_like(old), old + delta.double())
    logp = logp.requires_grad_()
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    adv = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
    return logp, old, adv, mask


def call(loss_fn: PolicyLoss, logp, old, adv, mask, agg="seq-mean-token-mean", weight=None):  # type: ignore[no-untyped-def]
    return loss_fn(logp, old, adv, mask, agg=agg, agg_constant=None, weight=weight)


def test_defaults_are_the_papers():
    gspo = SequenceRatio()
    assert (gspo.clip_low, gspo.clip_high, gspo.dual_clip, gspo.token_level) == (
        3e-4,
        4e-4,
        None,
        False,
    )
    assert gspo.needs == frozenset()


@pytest.mark.parametrize("token_level", [False, True])
def test_gspo_by_hand(token_level):
    # Per response, clip range [0.9997, 1.0004]:
    #   l0 = max(-1 * s0, -1 * clip(s0)) = -s0                (inside: not clipped)
    #   l1 = max(-2 * s1, -2 * 1.0004)   = -2.0008            (above, A > 0: clipped)
    #   l2 = max(+1 * s2, +1 * 0.9997)   = 0.9997             (below, A < 0: clipped)
    # seq-mean-token-mean = (l0 + l1 + l2) / 3 (each response's tokens carry its l_i).
    # Gradient: only row 0 is unclipped. GSPO: d l0 / d logp_t = -A0 * s0 / |y0| = -s0 / 2 and
    # the seq-mean divides by 3 -> -s0 / 6 at both tokens. GSPO-token: d l0t / d logp_t =
    # -A0 * s0 (value of s_0t is s0, its log-derivative 1 in logp_t), mean over 2 tokens and 3
    # responses -> -s0 / 6: the same, as the paper states for per-response advantages.
    logp, old, adv, mask = three_responses()
    loss, stats = call(SequenceRatio(token_level=token_level), logp, old, adv, mask)
    close(loss, (-S0 - 2.0008 + 0.9997) / 3)
    close(stats["seq_clip_frac"], 2 / 3)
    close(stats["clip_frac"], 4 / 6)  # rows 1 and 2: 3 + 1 of the 6 valid tokens
    close(stats["ratio_min"], S2)
    close(stats["ratio_max"], S1)
    close(stats["ratio_mean"], (S0 + S1 + S2) / 3)
    close(stats["dual_clip_frac"], 0.0)
    loss.backward()
    assert logp.grad is not None
    close(logp.grad, [[-S0 / 6, -S0 / 6, 0.0], [0.0] * 3, [0.0] * 3])


def test_token_mean_weighs_responses_by_length():
    # token-mean: (2 * l0 + 3 * l1 + 1 * l2) / 6.
    logp, old, adv, mask = three_responses()
    loss, _ = call(SequenceRatio(), logp, old, adv, mask, agg="token-mean")
    close(loss, (2 * -S0 + 3 * -2.0008 + 0.9997) / 6)


def test_gspo_token_with_per_token_advantages_by_hand():
    # Row 0 advantages [1, 3]: both tokens carry the value s0 (inside the range), so
    #   l_00 = -1 * s0, l_01 = -3 * s0 -> row mean -2 s0; rows 1 and 2 as before (clipped).
    # d l_0t / d logp_t = -A_0t * s0 -> / (2 tokens * 3 responses): [-s0 / 6, -s0 / 2].
    logp, old, _, mask = three_responses()
    adv = torch.tensor([[1.0, 3.0, 0.0], [2.0, 2.0, 2.0], [-1.0, 0.0, 0.0]], dtype=torch.float64)
    loss, _ = call(SequenceRatio(token_level=True), logp, old, adv, mask)
    close(loss, (-2 * S0 - 2.0008 + 0.9997) / 3)
    loss.backward()
    assert logp.grad is not None
    close(logp.grad, [[-S0 / 6, -S0 / 2, 0.0], [0.0] * 3, [0.0] * 3])
    with pytest.raises(ValueError, match="token_level=True"):
        call(SequenceRatio(), logp, old, adv, mask)


def test_a_token_weight_scales_the_loss_but_not_the_sequence_ratio():
    # weight row 0 = [1, 0], row 2 = [0]: row 0's loss is (1 * l0 + 0 * l0) / 2 = l0 / 2, row 2
    # contributes 0 but still counts among the 3 responses (the mask, not the weight, is the
    # normaliser: TokenWeighting.normalise = "all").
    #   loss = (-s0 / 2 - 2.0008 + 0) / 3.
    # The zero-weighted token (0, 1) still gets a gradient through s0, which averages over both
    # tokens: d/dlogp_t (l0 / 2) = (1/2) * (-s0 / 2) -> / 3 -> -s0 / 12 at both tokens of row 0.
    logp, old, adv, mask = three_responses()
    weight = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    loss, _ = call(SequenceRatio(), logp, old, adv, mask, weight=weight)
    close(loss, (-S0 / 2 - 2.0008) / 3)
    loss.backward()
    assert logp.grad is not None
    close(logp.grad, [[-S0 / 12, -S0 / 12, 0.0], [0.0] * 3, [0.0] * 3])
    with pytest.raises(ValueError, match="weight must be"):
        call(SequenceRatio(), logp, old, adv, mask, weight=weight[:, :2])


def test_dual_clip_caps_a_negative_advantage():
    # One response with A = -1 and s = e^0.5 = 1.6487 (above the range): l = max(1.6487, 1.0004)
    # = 1.6487; with dual_clip 1.5 it is capped at -A * 1.5 = 1.5 (no gradient).
    old = torch.tensor([[-1.0]], dtype=torch.float64)
    logp = (old + 0.5).requires_grad_()
    adv = torch.tensor([-1.0], dtype=torch.float64)
    mask = torch.ones(1, 1)
    loss, stats = call(SequenceRatio(), logp, old, adv, mask)
    close(loss, math.exp(0.5))
    loss, stats = call(SequenceRatio(dual_clip=1.5), logp, old, adv, mask)
    close(loss, 1.5)
    close(stats["dual_clip_frac"], 1.0)


def test_bad_clip_settings_name_the_config_key():
    with pytest.raises(ValueError, match=r"model\.policy_loss\.clip_low"):
        SequenceRatio(clip_low=1.0)
    with pytest.raises(ValueError, match=r"model\.policy_loss\.dual_clip"):
        SequenceRatio(dual_clip=0.5)
