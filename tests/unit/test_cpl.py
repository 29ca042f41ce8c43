"""Unit tests for the Contrastive Perception Loss against numbers derived by hand
(docs/method.md §3, §7)."""

from __future__ import annotations

import math

import pytest
import torch

from cppo_lightning.losses import contrastive_perception_loss, kl_estimate
from cppo_lightning.losses.cpl import contrast_divergences

LN2 = math.log(2.0)
LOG_HALF = math.log(0.5)
LOG_QUARTER = math.log(0.25)


def close(actual: torch.Tensor, expected, *, atol: float = 1e-6) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0.0)


# Three tokens; the third is not selected and holds garbage (-inf, huge, NaN).
#   token 0: logp = 0, logp+ = ln 0.5, logp- = ln 0.25
#   token 1: logp = 0, logp+ = ln 0.25, logp- = ln 0.5   (the views swapped)
LOGP = torch.tensor([[0.0, 0.0, -math.inf]])
LOGP_POS = torch.tensor([[LOG_HALF, LOG_QUARTER, 1e30]])
LOGP_NEG = torch.tensor([[LOG_QUARTER, LOG_HALF, math.nan]])
SELECTED = torch.tensor([[True, True, False]])

# k3 with d = other - anchor: ln 0.5 -> e^{-ln2} + ln2 - 1 = 0.5 + ln2 - 1 = 0.193147;
#                            ln 0.25 -> 0.25 + 2 ln2 - 1 = 0.636294.
K3_HALF = 0.5 + LN2 - 1.0
K3_QUARTER = 0.25 + 2.0 * LN2 - 1.0


def test_k3_by_hand():
    # token 0: D+ - D- = K3_HALF - K3_QUARTER = 0.25 - ln2 = -0.443147; / tau = 2.5 - 10 ln2;
    #   softplus = ln(1 + e^{2.5} 2^{-10}) = ln(1 + 12.182494 / 1024) = 0.011827.
    # token 1: the opposite argument -> ln(1 + 1024 e^{-2.5}) = ln(85.0551) = 4.443299.
    # loss = (0.011827 + 4.443299) / 2 = 2.227563 (the count 2 + 1e-8 rounds to 2 in float32).
    l0 = math.log1p(math.exp(2.5) / 1024)
    l1 = math.log1p(1024 / math.exp(2.5))
    assert l0 == pytest.approx(0.011827, abs=1e-6) and l1 == pytest.approx(4.443299, abs=1e-6)
    loss, stats = contrastive_perception_loss(LOGP, LOGP_POS, LOGP_NEG, SELECTED)
    close(loss, (l0 + l1) / 2, atol=1e-5)
    close(stats["cpl"], (l0 + l1) / 2, atol=1e-5)
    close(stats["d_pos"], (K3_HALF + K3_QUARTER) / 2, atol=1e-6)  # 0.414720
    close(stats["d_neg"], (K3_QUARTER + K3_HALF) / 2, atol=1e-6)
    close(stats["selected_tokens"], 2.0)
    close(stats["contrast_accuracy"], 0.5)  # only token 0 has D+ < D-
    assert all(not v.requires_grad and v.dim() == 0 for v in stats.values())


def test_k1_by_hand_and_anchor_cancels():
    # k1: D = anchor - other, so D+ - D- = logp- - logp+.
    # token 0: ln 0.25 - ln 0.5 = -ln2 -> softplus(-10 ln2) = ln(1 + 2^-10) = 0.000976;
    # token 1: +ln2 -> softplus(10 ln2) = ln(1 + 2^10) = ln 1025 = 6.932448.
    expected = (math.log1p(2.0**-10) + math.log(1025.0)) / 2
    loss, stats = contrastive_perception_loss(LOGP, LOGP_POS, LOGP_NEG, SELECTED, divergence="k1")
    close(loss, expected, atol=1e-5)
    # D+ = 0 - ln 0.5 = ln2 and 2 ln2 -> mean 1.5 ln2; D- likewise.
    close(stats["d_pos"], 1.5 * LN2)
    close(stats["d_neg"], 1.5 * LN2)
    shifted, _ = contrastive_perception_loss(
        LOGP - 0.7, LOGP_POS, LOGP_NEG, SELECTED, divergence="k1"
    )
    close(shifted, expected, atol=1e-5)


def test_k3_uses_the_clamped_reference_estimator():
    # anchor 0: other = -30 -> d = clamp(-30) = -20 -> e^-20 + 19 -> clamped to 10;
    #           other = +30 -> d = 20 -> e^20 - 21 -> clamped to 10.
    # D+ = D- = 10 -> softplus(0) = ln 2. A selected -inf is clamped the same way (finite).
    logp = torch.zeros(1, 2, requires_grad=True)
    pos = torch.tensor([[-30.0, -math.inf]], requires_grad=True)
    neg = torch.tensor([[30.0, 30.0]], requires_grad=True)
    loss, stats = contrastive_perception_loss(logp, pos, neg, torch.ones(1, 2))
    close(loss, LN2)
    close(stats["d_pos"], 10.0)
    loss.backward()
    for t in (logp, pos, neg):
        assert t.grad is not None and torch.isfinite(t.grad).all()
    # Agrees with kl_estimate(anchor, other) token by token, clamps active or not.
    gen = torch.Generator().manual_seed(0)
    a, o = torch.randn(4, 6, generator=gen) * 15, torch.randn(4, 6, generator=gen) * 15
    full = torch.ones(4, 6)
    _, stats = contrastive_perception_loss(a, o, a, full)
    close(stats["d_pos"], kl_estimate(a, o, kind="k3").mean(), atol=1e-5)


def test_exact_kl_by_hand():
    # Two tokens, V = 3, tau = 0.1; the inputs are log-probability distributions.
    # token 0: p = [0.5, 0.25, 0.25], p+ = p -> D+ = 0;
    #          p- = [0.25, 0.25, 0.5] -> D- = 0.5 ln(0.5/0.25) + 0 + 0.25 ln(0.25/0.5) = 0.25 ln2;
    #          l = softplus(-0.25 ln2 / 0.1) = ln(1 + 2^-2.5) = 0.162779.
    # token 1: p = [1, 0, 0] (log-probs [0, -inf, -inf]; the p = 0 terms are 0),
    #          p+ = [0.5, 0.5, 0] -> D+ = 1 * ln(1 / 0.5) = ln2;
    #          p- = [0.25, 0.5, 0.25] -> D- = ln 4 = 2 ln2;
    #          l = softplus(-ln2 / 0.1) = ln(1 + 2^-10) = 0.000976.
    # loss = (0.162779 + 0.000976) / 2 = 0.081878.
    p = torch.tensor([[[0.5, 0.25, 0.25], [1.0, 0.0, 0.0]]])
    p_pos = torch.tensor([[[0.5, 0.25, 0.25], [0.5, 0.5, 0.0]]])
    p_neg = torch.tensor([[[0.25, 0.25, 0.5], [0.25, 0.5, 0.25]]])
    logp, logp_pos, logp_neg = (x.log().requires_grad_() for x in (p, p_pos, p_neg))
    loss, stats = contrastive_perception_loss(
        logp, logp_pos, logp_neg, torch.ones(1, 2), divergence="kl"
    )
    close(loss, (math.log1p(2.0**-2.5) + math.log1p(2.0**-10)) / 2, atol=1e-6)
    close(stats["d_pos"], LN2 / 2)
    close(stats["d_neg"], (0.25 * LN2 + 2 * LN2) / 2)
    close(stats["contrast_accuracy"], 1.0)
    loss.backward()
    for t in (logp, logp_pos, logp_neg):
        assert t.grad is not None and torch.isfinite(t.grad).all()


def _reference(logp, pos, neg, mask, tau, divergence):
    """Straightforward transcription of docs/method.md §3 without clamps (inputs kept moderate)."""
    if divergence == "k3":

        def div(a, o):
            return torch.exp(o - a) - (o - a) - 1

    elif divergence == "k1":

        def div(a, o):
            return a - o

    else:

        def div(a, o):
            return (a.exp() * (a - o)).sum(-1)

    per_token = torch.log(1 + torch.exp((div(logp, pos) - div(logp, neg)) / tau))
    return (mask * per_token).sum() / (mask.sum() + 1e-8)


@pytest.mark.parametrize("divergence", ["k3", "k1", "kl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference_on_random_inputs(divergence, dtype):
    gen = torch.Generator().manual_seed(3)
    n, length, vocab = 4, 6, 5
    mask = (torch.rand(n, length, generator=gen) > 0.4).to(dtype)
    if divergence == "kl":
        logp, pos, neg = (
            torch.log_softmax(torch.randn(n, length, vocab, generator=gen, dtype=dtype), dim=-1)
            for _ in range(3)
        )
    else:
        # logp in (-2, 0): |other - anchor| < 2, so k3 < e^2 - 3 = 4.39 and no clamp is active.
        logp, pos, neg = (-2 * torch.rand(n, length, generator=gen, dtype=dtype) for _ in range(3))
    for tau in (0.1, 1.0):
        loss, _ = contrastive_perception_loss(logp, pos, neg, mask, tau=tau, divergence=divergence)
        close(loss, _reference(logp, pos, neg, mask, tau, divergence).item(), atol=1e-5)


def _random_views(seed: int, requires_grad: bool = True):
    gen = torch.Generator().manual_seed(seed)
    views = [-2 * torch.rand(3, 5, generator=gen) for _ in range(3)]
    return [v.requires_grad_(requires_grad) for v in views]


SEL = torch.tensor(
    [[1, 0, 1, 1, 0], [0, 0, 0, 0, 0], [0, 1, 0, 1, 1]],
    dtype=torch.bool,
)


@pytest.mark.parametrize("divergence", ["k3", "k1"])
def test_gradients_reach_all_three_branches_at_selected_tokens_only(divergence):
    logp, pos, neg = _random_views(4)
    loss, _ = contrastive_perception_loss(logp, pos, neg, SEL, divergence=divergence)
    loss.backward()
    for t in (pos, neg) if divergence == "k1" else (logp, pos, neg):
        assert t.grad is not None
        assert (t.grad[SEL] != 0).all()
        assert (t.grad[~SEL] == 0).all()
    if divergence == "k1":  # the anchor cancels exactly: zero gradient
        assert logp.grad is not None and (logp.grad == 0).all()


def test_stop_gradient_anchor():
    logp, pos, neg = _random_views(5)
    loss, _ = contrastive_perception_loss(logp, pos, neg, SEL, stop_gradient_anchor=True)
    loss.backward()
    assert logp.grad is None or (logp.grad == 0).all()
    assert pos.grad is not None and (pos.grad[SEL] != 0).all()
    assert neg.grad is not None and (neg.grad[SEL] != 0).all()
    # The value does not change, only the gradient path.
    plain, _ = contrastive_perception_loss(logp, pos, neg, SEL)
    close(loss.detach(), plain.detach())


@pytest.mark.parametrize("divergence", ["k3", "k1", "kl"])
def test_empty_selection_is_exactly_zero_and_backpropagates(divergence):
    shape = (2, 3, 4) if divergence == "kl" else (2, 3)
    logp, pos, neg = (torch.randn(shape).requires_grad_() for _ in range(3))
    loss, stats = contrastive_perception_loss(
        logp, pos, neg, torch.zeros(2, 3), divergence=divergence
    )
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    for t in (logp, pos, neg):
        assert t.grad is not None and (t.grad == 0).all()
    for key in ("cpl", "d_pos", "d_neg", "selected_tokens", "contrast_accuracy"):
        assert stats[key].item() == 0.0


def test_nonfinite_values_at_unselected_positions_give_finite_gradients():
    logp, pos, neg = (v.detach().clone() for v in _random_views(6, requires_grad=False))
    logp[~SEL] = -math.inf
    pos[~SEL] = 1e30
    neg[~SEL] = math.nan
    for t in (logp, pos, neg):
        t.requires_grad_()
    loss, stats = contrastive_perception_loss(logp, pos, neg, SEL)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in stats.values())
    for t in (logp, pos, neg):
        assert t.grad is not None and torch.isfinite(t.grad).all()
        assert (t.grad[~SEL] == 0).all()


def test_exact_kl_nonfinite_padding_and_masked_vocab():
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 3, 5, 4, generator=gen)
    logits[..., 0] = -math.inf  # a masked vocabulary entry in every view
    logp, pos, neg = (torch.log_softmax(x, dim=-1) for x in logits.unbind(0))
    sel = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 0, 0], [1, 0, 0, 0, 1]], dtype=torch.bool)
    logp, pos, neg = (x.detach().clone() for x in (logp, pos, neg))
    logp[~sel] = math.nan  # padding that holds garbage
    pos[~sel] = -math.inf
    for t in (logp, pos, neg):
        t.requires_grad_()
    loss, _ = contrastive_perception_loss(logp, pos, neg, sel, divergence="kl")
    loss.backward()
    assert torch.isfinite(loss)
    for t in (logp, pos, neg):
        assert t.grad is not None and torch.isfinite(t.grad).all()
        assert (t.grad[~sel] == 0).all()
        assert (t.grad[..., 0] == 0).all()


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(8)
    views = [(-2 * torch.rand(2, 3, generator=gen, dtype=torch.float64)) for _ in range(3)]
    views = [v.requires_grad_() for v in views]
    sel = torch.tensor([[1, 0, 1], [1, 1, 0]])
    for divergence in ("k3", "k1"):
        assert torch.autograd.gradcheck(
            lambda a, b, c, d=divergence: contrastive_perception_loss(a, b, c, sel, divergence=d)[
                0
            ],
            views,
        )
    logits = [
        torch.randn(2, 3, 4, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(3)
    ]
    assert torch.autograd.gradcheck(
        lambda a, b, c: contrastive_perception_loss(
            *(torch.log_softmax(x, dim=-1) for x in (a, b, c)), sel, divergence="kl", tau=0.5
        )[0],
        logits,
    )


def test_lower_loss_means_better_contrast():
    # Pulling the positive view towards the anchor and pushing the negative away lowers the loss.
    logp = torch.zeros(1, 1)
    base, _ = contrastive_perception_loss(logp, logp - 0.5, logp - 0.5, torch.ones(1, 1))
    close(base, LN2)  # D+ = D- -> softplus(0)
    better, stats = contrastive_perception_loss(logp, logp - 0.1, logp - 1.5, torch.ones(1, 1))
    worse, _ = contrastive_perception_loss(logp, logp - 1.5, logp - 0.1, torch.ones(1, 1))
    assert better < base < worse
    close(stats["contrast_accuracy"], 1.0)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((torch.zeros(1, 2),) * 4, {"tau": 0.0}, "tau must be a finite number > 0"),
        ((torch.zeros(1, 2),) * 4, {"tau": -0.1}, "tau must be a finite number > 0"),
        ((torch.zeros(1, 2),) * 4, {"tau": math.nan}, "tau must be a finite number > 0"),
        ((torch.zeros(1, 2),) * 4, {"divergence": "js"}, "divergence must be one of"),
        (
            (torch.zeros(1, 2), torch.zeros(1, 3), torch.zeros(1, 2), torch.zeros(1, 2)),
            {},
            "must have the same shape",
        ),
        (
            (torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 3)),
            {},
            "a mask of the same shape",
        ),
        ((torch.zeros(1, 2, 3),) * 3 + (torch.zeros(1, 2),), {}, "use divergence='kl'"),
        ((torch.zeros(1, 2),) * 4, {"divergence": "kl"}, r"needs log-probability distributions"),
        (
            (torch.zeros(1, 2, 3),) * 3 + (torch.zeros(1, 3),),
            {"divergence": "kl"},
            r"needs log-probability distributions",
        ),
    ],
)
def test_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        contrastive_perception_loss(*args, **kwargs)


def test_contrast_divergences_is_the_shared_tail():
    # D+ = (0.2, 1.0), D- = (0.5, 0.5), tau = 0.5: softplus(-0.6) = ln(1 + e^-0.6) = 0.437488,
    # softplus(1.0) = ln(1 + e) = 1.313262; loss = (0.437488 + 1.313262) / 2 = 0.875375.
    d_pos = torch.tensor([0.2, 1.0], dtype=torch.float64)
    d_neg = torch.tensor([0.5, 0.5], dtype=torch.float64)
    loss, stats = contrast_divergences(d_pos, d_neg, tau=0.5)
    expected = (math.log1p(math.exp(-0.6)) + math.log1p(math.e)) / (2 + 1e-8)
    close(loss, expected, atol=1e-12)
    close(stats["d_pos"], 0.6, atol=1e-12)
    close(stats["d_neg"], 0.5, atol=1e-12)
    close(stats["selected_tokens"], 2.0)
    close(stats["contrast_accuracy"], 0.5)
    # contrastive_perception_loss ends in it: the same value from the sampled-token estimates.
    full, full_stats = contrastive_perception_loss(LOGP, LOGP_POS, LOGP_NEG, SELECTED)
    d_pos3 = kl_estimate(LOGP[SELECTED], LOGP_POS[SELECTED])
    d_neg3 = kl_estimate(LOGP[SELECTED], LOGP_NEG[SELECTED])
    tail, tail_stats = contrast_divergences(d_pos3, d_neg3, tau=0.1)
    close(full, tail.item(), atol=0.0)
    for key, value in full_stats.items():
        close(tail_stats[key], value.item(), atol=0.0)
    empty, empty_stats = contrast_divergences(torch.zeros(0), torch.zeros(0))
    assert empty.item() == 0.0 and empty_stats["contrast_accuracy"].item() == 0.0
    with pytest.raises(ValueError, match="tau must be a finite number > 0"):
        contrast_divergences(d_pos, d_neg, tau=0.0)
    with pytest.raises(ValueError, match=r"must both be \[S\]"):
        contrast_divergences(d_pos, d_neg[:1])
