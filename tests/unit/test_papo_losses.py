"""Unit tests for PAPO's implicit perception loss (docs/method.md §5)."""

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


# --- ImplicitPerception: which branches the default trains ------------------------------------


def _papo_micro_batch():  # type: ignore[no-untyped-def]
    """A float64 micro-batch of 3 responses whose two forwards are plain leaf hidden states
    scored by one trainable LM head: ``hidden`` under the original image, ``masked`` under the
    masked one. Gradients on ``masked`` (or the head's share from it) are the masked branch's."""
    from cppo_lightning.logprobs import ResponseScores, Scoring
    from cppo_lightning.perception import MicroBatch

    gen = torch.Generator().manual_seed(0)
    n, length, hidden_size, vocab = 3, 4, 5, 7
    head = torch.nn.Linear(hidden_size, vocab, bias=False, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden_size, generator=gen, dtype=torch.float64))
    hidden = torch.randn(n, length, hidden_size, generator=gen, dtype=torch.float64)
    masked = torch.randn(n, length, hidden_size, generator=gen, dtype=torch.float64)
    hidden.requires_grad_()
    masked.requires_grad_()
    ids = torch.randint(0, vocab, (n, length), generator=gen)
    response_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
    scores = ResponseScores(hidden, head, ids, Scoring())

    def view_scores(view: str, rows: torch.Tensor) -> ResponseScores:
        assert view == "removing"
        return ResponseScores(masked[rows], head, ids[rows], Scoring())

    batch = MicroBatch(
        scores=scores,
        logp=scores.logps(),
        response_ids=ids,
        response_mask=response_mask,
        advantages=torch.zeros(n, dtype=torch.float64),
        view_scores=view_scores,
    )
    return batch, head, hidden, masked


def _papo_expected(batch, head, hidden, masked, *, masked_grad: bool):  # type: ignore[no-untyped-def]
    """gamma * (-KL_k3) + 0.03 * H + 0.03 * H_mask with the default weights, built from the
    loss functions (checked by hand above), the masked log-probs constant unless masked_grad."""
    from cppo_lightning.logprobs import ResponseScores, Scoring

    logp = ResponseScores(hidden, head, batch.response_ids, Scoring()).logps()
    with torch.set_grad_enabled(masked_grad):
        logp_masked = ResponseScores(masked, head, batch.response_ids, Scoring()).logps()
    mask = batch.response_mask
    ipl, _ = implicit_perception_loss(logp, logp_masked, mask)
    entropy = ((-logp) * mask).sum() / mask.sum()
    masked_entropy = ((-logp_masked) * mask).sum() / mask.sum()
    return 0.02 * ipl + 0.03 * entropy + 0.03 * masked_entropy


def test_papo_default_stops_gradients_through_the_masked_branch():
    # PAPO's code (MikeWangWZHL/PAPO, verl/workers/actor/dp_actor.py, RECOMPUTE_AUG_LOG_PROBS =
    # False) reads the masked log-probs computed under no_grad at rollout time: the KL pushes
    # only the original-image branch, and the masked entropy term has no gradient. The default
    # must do the same: no gradient reaches the masked hidden states, and the LM head's gradient
    # is the original branch's alone (detaching the hidden states only would leak into it).
    from cppo_lightning.perception import ImplicitPerception

    batch, head, hidden, masked = _papo_micro_batch()
    term = ImplicitPerception()(batch, None, None)
    grad_hidden, grad_masked, grad_head = torch.autograd.grad(
        term.loss, (hidden, masked, head.weight), allow_unused=True
    )
    assert grad_masked is None, "the masked branch got a gradient"
    expected = _papo_expected(batch, head, hidden, masked, masked_grad=False)
    close(term.loss, expected.detach(), atol=1e-12)
    want = torch.autograd.grad(expected, (hidden, head.weight))
    for g, w in zip((grad_hidden, grad_head), want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=0.0)


def test_papo_without_detach_trains_the_masked_branch_too():
    # detach_masked: false is PAPO's RECOMPUTE_AUG_LOG_PROBS = True: the masked forward keeps
    # its graph, so the masked hidden states get the KL's and the masked entropy's gradient.
    from cppo_lightning.perception import ImplicitPerception

    batch, head, hidden, masked = _papo_micro_batch()
    term = ImplicitPerception(detach_masked=False)(batch, None, None)
    got = torch.autograd.grad(term.loss, (hidden, masked, head.weight))
    assert got[1].abs().sum() > 0
    expected = _papo_expected(batch, head, hidden, masked, masked_grad=True)
    close(term.loss, expected.detach(), atol=1e-12)
    want = torch.autograd.grad(expected, (hidden, masked, head.weight))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=0.0)
