"""Unit tests for cppo_lightning.losses.grpo against numbers derived by hand
(docs/method.md §1, §7)."""

from __future__ import annotations

import math

import pytest
import torch

from cppo_lightning.losses import aggregate, group_advantages, kl_estimate, policy_loss

LN2 = math.log(2.0)


def close(actual: torch.Tensor, expected, *, atol: float = 1e-6) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0.0)


# --------------------------------------------------------------------------------------------
# group_advantages
# --------------------------------------------------------------------------------------------


def test_group_advantages_two_groups_of_two_by_hand():
    # rewards [1, 0 | 0, 1], G = 2. Each group: mean 0.5, deviations +-0.5,
    # sample std = sqrt((0.5^2 + 0.5^2) / (2 - 1)) = sqrt(0.5) = 0.70711.
    # A = +-0.5 / (0.70711 + 1e-6).
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), group_size=2)
    a = 0.5 / (math.sqrt(0.5) + 1e-6)
    close(adv, [a, -a, -a, a])
    assert a == pytest.approx(0.70711, abs=1e-5)


def test_group_advantages_group_of_three_by_hand():
    # rewards [1, 0, 0], G = 3: mean 1/3, deviations [2/3, -1/3, -1/3],
    # sample var = (4/9 + 1/9 + 1/9) / 2 = 1/3, std = 0.57735.
    # A = [0.66667, -0.33333, -0.33333] / 0.57735 = [1.15470, -0.57735, -0.57735].
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0]), group_size=3, eps=0.0)
    close(adv, [1.15470, -0.57735, -0.57735], atol=1e-5)


@pytest.mark.parametrize(
    ("scale", "expected"),
    [
        # rewards [2, 0 | 1, 1], G = 2. Group 1: mean 1, deviations [1, -1], std sqrt(2).
        # Group 2 has equal rewards -> [0, 0] under every scale.
        ("group", [1 / (math.sqrt(2) + 1e-6), -1 / (math.sqrt(2) + 1e-6), 0.0, 0.0]),
        # Batch: std of [2, 0, 1, 1] (mean 1) = sqrt((1 + 1 + 0 + 0) / 3) = 0.81650,
        # group 1 -> +-1 / 0.81650 = +-1.22474.
        ("batch", [1 / (math.sqrt(2 / 3) + 1e-6), -1 / (math.sqrt(2 / 3) + 1e-6), 0.0, 0.0]),
        # None: just r - group mean.
        ("none", [1.0, -1.0, 0.0, 0.0]),
    ],
)
def test_group_advantages_scale_options(scale, expected):
    adv = group_advantages(torch.tensor([2.0, 0.0, 1.0, 1.0]), group_size=2, scale=scale)
    close(adv, expected)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_zero_variance_group_is_exactly_zero(scale):
    # 0.9 (= 0.9 * accuracy + 0.1 * format for a correct answer with a bad format) is not exact in
    # float32: mean([0.9] * 3) - 0.9 = 5.96e-8, which / (std ~ 0 + 1e-6) would give a spurious
    # advantage of 0.056. So this checks the explicit zeroing, not luck. The second group keeps
    # the batch std non-zero.
    rewards = torch.tensor([0.9, 0.9, 0.9, 0.0, 1.0, 0.3])
    adv = group_advantages(rewards, group_size=3, scale=scale)
    assert torch.equal(adv[:3], torch.zeros(3))
    assert (adv[3:] != 0).all()


def test_group_advantages_integer_rewards_and_zero_mean_per_group():
    rewards = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0], dtype=torch.int64)
    adv = group_advantages(rewards, group_size=4)
    assert adv.dtype == torch.get_default_dtype()
    close(adv.view(2, 4).sum(dim=1), [0.0, 0.0], atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rewards": torch.zeros(4), "group_size": 1}, "group_size must be an int >= 2"),
        ({"rewards": torch.zeros(4), "group_size": 2.0}, "group_size must be an int >= 2"),
        ({"rewards": torch.zeros(5), "group_size": 2}, "not a multiple of group_size"),
        ({"rewards": torch.zeros(2, 2), "group_size": 2}, "must be 1-D"),
        ({"rewards": torch.zeros(4), "group_size": 2, "scale": "std"}, "scale must be one of"),
        ({"rewards": torch.zeros(4), "group_size": 2, "eps": -1.0}, "eps must be >= 0"),
    ],
)
def test_group_advantages_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(**kwargs)


# --------------------------------------------------------------------------------------------
# kl_estimate
# --------------------------------------------------------------------------------------------


def test_kl_estimators_by_hand():
    # Token 0: p = 0.5, p_ref = 0.25 -> d = ln 0.25 - ln 0.5 = -ln 2;
    #   k3 = e^{-ln2} + ln2 - 1 = 0.5 + 0.693147 - 1 = 0.193147.
    # Token 1: p = 0.25, p_ref = 0.5 -> d = +ln 2; k3 = 2 - 0.693147 - 1 = 0.306853.
    # Token 2: equal -> d = 0 -> k3 = 1 - 0 - 1 = 0.
    # Token 3: ref_logp - logp = -5 -> k3 = e^-5 + 5 - 1 = 4.006738.
    logp = torch.tensor([[math.log(0.5), math.log(0.25), -1.0, 0.0]])
    ref = torch.tensor([[math.log(0.25), math.log(0.5), -1.0, -5.0]])
    close(kl_estimate(logp, ref), [[0.193147, 0.306853, 0.0, 4.006738]], atol=1e-5)
    # k1 = logp - ref_logp; k2 = 0.5 * (logp - ref_logp)^2 (0.5 * ln2^2 = 0.240227).
    close(kl_estimate(logp, ref, kind="k1"), [[LN2, -LN2, 0.0, 5.0]], atol=1e-6)
    close(kl_estimate(logp, ref, kind="k2"), [[0.240227, 0.240227, 0.0, 12.5]], atol=1e-5)


def test_k3_clamps():
    # d = ref - logp: +30 -> clamped to 20, e^20 - 21 ~ 4.85e8 -> clamped to 10.
    #                 -30 -> clamped to -20, e^-20 + 19 ~ 19 -> clamped to 10.
    logp = torch.tensor([[0.0, -30.0]])
    ref = torch.tensor([[-30.0, 0.0]])
    out = kl_estimate(logp, ref)
    assert torch.equal(out, torch.full((1, 2), 10.0))
    assert torch.isfinite(kl_estimate(torch.tensor([[0.0]]), torch.tensor([[-math.inf]]))).all()


def test_k3_gradcheck_away_from_clamps():
    gen = torch.Generator().manual_seed(0)
    logp = (-torch.rand(3, 4, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    ref = (-torch.rand(3, 4, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    # |d| <= 2 -> k3 <= e^2 - 3 < 10: both clamps inactive.
    assert torch.autograd.gradcheck(lambda a, b: kl_estimate(a, b, kind="k3"), (logp, ref))


def test_kl_estimate_errors():
    with pytest.raises(ValueError, match=r"kind must be one of \('k1', 'k2', 'k3'\)"):
        kl_estimate(torch.zeros(1, 2), torch.zeros(1, 2), kind="k4")
    with pytest.raises(ValueError, match="same shape"):
        kl_estimate(torch.zeros(1, 2), torch.zeros(1, 3))


# --------------------------------------------------------------------------------------------
# aggregate
# --------------------------------------------------------------------------------------------

VALUES = torch.tensor([[1.0, 2.0, 3.0], [4.0, 99.0, -99.0]])
MASK = torch.tensor([[1, 1, 1], [1, 0, 0]])


@pytest.mark.parametrize(
    ("agg", "constant", "expected"),
    [
        # valid tokens 1, 2, 3 | 4: sum 10, count 4 -> 2.5.
        ("token-mean", None, 2.5),
        # per-sequence means 2 and 4 -> 3.
        ("seq-mean-token-mean", None, 3.0),
        # 10 / (N * constant) = 10 / (2 * 3).
        ("seq-sum-constant", 3, 10 / 6),
    ],
)
def test_aggregations_by_hand(agg, constant, expected):
    close(aggregate(VALUES, MASK, agg=agg, constant=constant), expected)


def test_aggregate_skips_empty_sequences_and_empty_batch():
    values = torch.tensor([[1.0, 2.0], [9.0, 9.0]])
    mask = torch.tensor([[1, 1], [0, 0]])
    # The empty row neither counts as a sequence (seq mean 1.5, not 0.75) nor adds tokens.
    close(aggregate(values, mask, agg="seq-mean-token-mean"), 1.5)
    close(aggregate(values, mask), 1.5)
    for agg in ("token-mean", "seq-mean-token-mean"):
        close(aggregate(values, torch.zeros_like(mask), agg=agg), 0.0)


def test_aggregate_ignores_nonfinite_padding():
    values = torch.tensor([[1.0, math.nan], [math.inf, 3.0]])
    mask = torch.tensor([[True, False], [False, True]])
    close(aggregate(values, mask), 2.0)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((torch.zeros(2, 3), torch.zeros(2, 2)), {}, r"must both be \[N, L\]"),
        ((torch.zeros(6), torch.zeros(6)), {}, r"must both be \[N, L\]"),
        ((VALUES, MASK), {"agg": "mean"}, "agg must be one of"),
        ((VALUES, MASK), {"agg": "seq-sum-constant"}, "needs constant="),
        ((VALUES, MASK), {"agg": "seq-sum-constant", "constant": 0}, "constant must be > 0"),
    ],
)
def test_aggregate_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        aggregate(*args, **kwargs)


# --------------------------------------------------------------------------------------------
# policy_loss
# --------------------------------------------------------------------------------------------

# Two responses x two tokens, eps_low = eps_high = 0.2 (clip range [0.8, 1.2]), dual clip c = 3:
#   row 0, A = +1: rho = 1.1 -> l1 = -1.1, l2 = -1.1        -> l = -1.1 (unclipped)
#                  rho = 1.5 -> l1 = -1.5, l2 = -1.2        -> l = -1.2 (clipped: l2 > l1)
#   row 1, A = -1: rho = 0.5 -> l1 =  0.5, l2 =  0.8        -> l =  0.8 (clipped: l2 > l1)
#                  rho = 5.0 -> l1 =  5.0, l2 =  1.2 -> max 5.0, dual: min(5.0, 1 * 3) = 3.0
# token-mean = (-1.1 - 1.2 + 0.8 + 3.0) / 4 = 1.5 / 4 = 0.375
RATIOS = torch.tensor([[1.1, 1.5], [0.5, 5.0]])
ADV = torch.tensor([1.0, -1.0])
OLD = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]])
LOGP = OLD + RATIOS.log()
FULL = torch.ones(2, 2)


def test_policy_loss_two_by_two_by_hand():
    loss, stats = policy_loss(LOGP, OLD, ADV, FULL)
    close(loss, 0.375, atol=1e-5)
    close(stats["loss"], 0.375, atol=1e-5)
    close(stats["clip_frac"], 0.5)  # tokens (0, 1) and (1, 0)
    close(stats["dual_clip_frac"], 0.25)  # token (1, 1)
    close(stats["ratio_mean"], (1.1 + 1.5 + 0.5 + 5.0) / 4, atol=1e-5)  # 2.025
    # approx_kl = mean(old_logp - logp) = -ln(1.1 * 1.5 * 0.5 * 5.0) / 4 = -ln(4.125) / 4
    close(stats["approx_kl"], -math.log(4.125) / 4, atol=1e-5)  # -0.354268


def test_policy_loss_without_dual_clip_and_with_clip_higher():
    # dual_clip=None: token (1, 1) keeps l = 5.0 -> (-1.1 - 1.2 + 0.8 + 5.0) / 4 = 0.875.
    loss, stats = policy_loss(LOGP, OLD, ADV, FULL, dual_clip=None)
    close(loss, 0.875, atol=1e-5)
    close(stats["dual_clip_frac"], 0.0)
    # clip_high = 0.28 (DAPO): token (0, 1) is clipped at 1.28 instead of 1.2
    # -> (-1.1 - 1.28 + 0.8 + 3.0) / 4 = 1.42 / 4 = 0.355.
    loss, _ = policy_loss(LOGP, OLD, ADV, FULL, clip_high=0.28)
    close(loss, 0.355, atol=1e-5)


def test_policy_loss_per_token_advantages_and_aggregations():
    # The same advantages given per token give the same loss.
    loss, _ = policy_loss(LOGP, OLD, ADV[:, None].expand(2, 2), FULL)
    close(loss, 0.375, atol=1e-5)
    # seq-mean-token-mean: row means (-1.1 - 1.2) / 2 = -1.15 and (0.8 + 3.0) / 2 = 1.9
    # -> (-1.15 + 1.9) / 2 = 0.375 as well with equal lengths; mask token (1, 1) to tell apart:
    # token-mean = (-1.1 - 1.2 + 0.8) / 3 = -0.5; seq-mean = (-1.15 + 0.8) / 2 = -0.175;
    # seq-sum-constant with constant 4: (-1.5) / (2 * 4) = -0.1875.
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    close(policy_loss(LOGP, OLD, ADV, mask)[0], -0.5, atol=1e-5)
    close(policy_loss(LOGP, OLD, ADV, mask, agg="seq-mean-token-mean")[0], -0.175, atol=1e-5)
    close(
        policy_loss(LOGP, OLD, ADV, mask, agg="seq-sum-constant", agg_constant=4)[0],
        -0.1875,
        atol=1e-5,
    )


def test_policy_loss_at_ratio_one_is_minus_mean_advantage():
    # rho = 1 everywhere -> l = -A on every token, no clipping, loss = -mean(A) over tokens.
    logp = torch.randn(3, 5)
    adv = torch.tensor([0.5, -2.0, 1.0])
    loss, stats = policy_loss(logp, logp.clone(), adv, torch.ones(3, 5))
    close(loss, -adv.mean())
    close(stats["clip_frac"], 0.0)
    close(stats["ratio_mean"], 1.0)
    close(stats["approx_kl"], 0.0)


def test_padding_does_not_change_loss_or_receive_gradient():
    gen = torch.Generator().manual_seed(1)
    old = -torch.rand(4, 6, generator=gen) * 3
    logp = old + (torch.rand(4, 6, generator=gen) - 0.5)
    adv = torch.randn(4, generator=gen)
    lengths = torch.tensor([6, 3, 1, 4])
    mask = (torch.arange(6)[None, :] < lengths[:, None]).float()
    pad = mask == 0

    for agg, const in [
        ("token-mean", None),
        ("seq-mean-token-mean", None),
        ("seq-sum-constant", 6),
    ]:
        x = logp.clone().requires_grad_()
        ref_loss, ref_stats = policy_loss(x, old, adv, mask, agg=agg, agg_constant=const)
        ref_loss.backward()
        assert torch.equal(x.grad[pad], torch.zeros(int(pad.sum())))

        # Garbage in the padding (huge, -inf) must leave the loss and every stat unchanged.
        garbage = logp.masked_fill(pad, 1e4).masked_fill(
            pad & (torch.arange(6) % 2 == 0), -math.inf
        )
        old_garbage = old.masked_fill(pad, -1e4)
        loss, stats = policy_loss(garbage, old_garbage, adv, mask, agg=agg, agg_constant=const)
        torch.testing.assert_close(loss, ref_loss.detach())
        for key in ref_stats:
            torch.testing.assert_close(stats[key], ref_stats[key])


def test_gradient_is_minus_a_ratio_over_count_on_unclipped_tokens_and_zero_on_clipped():
    gen = torch.Generator().manual_seed(2)
    n, length = 6, 8
    old = -torch.rand(n, length, generator=gen, dtype=torch.float64) * 3
    # log-ratios in [-0.6, 0.6]: ratios in [0.55, 1.82], both sides of the [0.8, 1.2] range.
    log_ratio = (torch.rand(n, length, generator=gen, dtype=torch.float64) - 0.5) * 1.2
    log_ratio[1, 0] = math.log(5.0)  # A < 0 below, ratio 5 > 3: dual-clipped
    adv = torch.tensor([1.0, -1.5, 0.7, -0.3, 2.0, -0.8], dtype=torch.float64)
    mask = torch.ones(n, length, dtype=torch.float64)
    mask[0, 5:] = 0
    mask[3, 2:] = 0

    logp = (old + log_ratio).requires_grad_()
    loss, _ = policy_loss(logp, old, adv, mask)
    loss.backward()

    ratio = log_ratio.exp()
    a = adv[:, None].expand(n, length)
    in_range = (ratio >= 0.8) & (ratio <= 1.2)
    # The surrogate is unclipped where rho is inside the range, or outside it on the side the
    # advantage penalises (A > 0 and rho < 0.8, A < 0 and rho > 1.2) - unless dual-clipped.
    unclipped = in_range | ((a > 0) & (ratio < 0.8)) | ((a < 0) & (ratio > 1.2))
    dual = (a < 0) & (ratio > 3.0)
    active = unclipped & ~dual & mask.bool()
    expected = torch.where(active, -a * ratio / mask.sum(), torch.zeros_like(ratio))
    torch.testing.assert_close(logp.grad, expected)
    # Make sure every case actually occurs.
    assert active.any() and (mask.bool() & ~unclipped).any() and (dual & mask.bool()).any()


def test_stats_are_detached_scalars():
    logp = LOGP.clone().requires_grad_()
    _, stats = policy_loss(logp, OLD, ADV, FULL)
    assert set(stats) == {"clip_frac", "dual_clip_frac", "ratio_mean", "approx_kl", "loss"}
    for value in stats.values():
        assert value.shape == () and not value.requires_grad


def test_extreme_log_ratio_stays_finite():
    logp = torch.tensor([[0.0, 0.0]], requires_grad=True)
    old = torch.tensor([[-1e4, 1e4]])
    loss, stats = policy_loss(logp, old, torch.tensor([-1.0]), torch.ones(1, 2))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    assert all(torch.isfinite(v) for v in stats.values())


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((LOGP, OLD[:, :1], ADV, FULL), {}, "must all be"),
        ((LOGP, OLD, ADV, torch.ones(2, 3)), {}, "must all be"),
        ((LOGP[0], OLD[0], ADV, FULL[0]), {}, "must all be"),
        ((LOGP, OLD, torch.ones(3), FULL), {}, r"advantages must be \[N\]"),
        ((LOGP, OLD, ADV, FULL), {"clip_low": 1.0}, r"clip_low must be in \[0, 1\)"),
        ((LOGP, OLD, ADV, FULL), {"clip_low": -0.1}, r"clip_low must be in \[0, 1\)"),
        ((LOGP, OLD, ADV, FULL), {"clip_high": -0.1}, "clip_high must be >= 0"),
        ((LOGP, OLD, ADV, FULL), {"dual_clip": 1.0}, "dual_clip must be > 1"),
        ((LOGP, OLD, ADV, FULL), {"agg": "sum"}, "agg must be one of"),
        ((LOGP, OLD, ADV, FULL), {"agg": "seq-sum-constant"}, "needs constant="),
    ],
)
def test_policy_loss_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        policy_loss(*args, **kwargs)
