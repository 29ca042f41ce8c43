"""The CPL's exact-KL path (``divergence: kl``) reads the three views through the chunked LM head:
it equals the full-distribution path in values and gradients, and never applies the head to more
than ``chunk_tokens`` positions at once."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from cppo_lightning.detection import TokenSelector
from cppo_lightning.logprobs import ResponseScores, Scoring, selected_kl
from cppo_lightning.losses import contrastive_perception_loss
from cppo_lightning.perception import ContrastivePerception, MicroBatch

N, LENGTH, SIZE, VOCAB = 4, 6, 8, 50
VIEWS = ("original", "preserving", "removing")


def _inputs(seed: int = 0, dtype: torch.dtype = torch.float64) -> dict[str, Any]:
    """A float64 head (with bias) and random hidden states of the three views; row 2 has a
    negative advantage (gated out), row 0 is padded; 10 selected tokens in the gated rows."""
    gen = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(SIZE, VOCAB).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(VOCAB, SIZE, generator=gen, dtype=dtype))
        head.bias.copy_(torch.randn(VOCAB, generator=gen, dtype=dtype) * 0.1)
    hidden = {
        view: (torch.randn(N, LENGTH, SIZE, generator=gen, dtype=dtype) * 0.7).requires_grad_()
        for view in VIEWS
    }
    ids = torch.randint(VOCAB, (N, LENGTH), generator=gen)
    mask = torch.ones(N, LENGTH, dtype=torch.long)
    mask[0, -2:] = 0
    selected = torch.tensor(
        [
            [1, 1, 0, 1, 0, 0],
            [0, 1, 1, 1, 0, 1],
            [1, 1, 1, 1, 1, 1],  # gated out: never enters the loss
            [1, 0, 0, 1, 0, 1],
        ],
        dtype=torch.bool,
    )
    advantages = torch.tensor([0.5, 1.0, -0.3, 0.2], dtype=dtype)
    return {
        "head": head,
        "hidden": hidden,
        "ids": ids,
        "mask": mask,
        "selected": selected,
        "advantages": advantages,
    }


def _micro_batch(data: dict[str, Any], scoring: Scoring) -> MicroBatch:
    head, hidden, ids = data["head"], data["hidden"], data["ids"]
    scores = ResponseScores(hidden["original"], head, ids, scoring)

    def view_scores(view: str, rows: torch.Tensor) -> ResponseScores:
        return ResponseScores(hidden[view][rows], head, ids[rows], scoring)

    return MicroBatch(
        scores=scores,
        logp=scores.logps(),
        response_ids=ids,
        response_mask=data["mask"],
        advantages=data["advantages"],
        view_scores=view_scores,
        perception_mask=data["selected"],
    )


def _old_kl_loss(
    data: dict[str, Any], scoring: Scoring, tau: float, stop_gradient_anchor: bool
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The path before the chunked KL: ``[S, V]`` log-softmax of all three views at once, then
    ``contrastive_perception_loss(divergence="kl")``."""
    rows = torch.nonzero(data["advantages"] > 0).flatten()
    selected = data["selected"][rows] & data["mask"][rows].bool()  # [m, L]
    dists = tuple(
        ResponseScores(
            data["hidden"][view][rows], data["head"], data["ids"][rows], scoring
        ).log_distribution(selected)[None]  # [1, S, V]
        for view in VIEWS
    )
    return contrastive_perception_loss(
        dists[0],
        dists[1],
        dists[2],
        torch.ones_like(dists[0][..., 0]),  # [1, S]
        tau=tau,
        divergence="kl",
        stop_gradient_anchor=stop_gradient_anchor,
    )


def _wrt(data: dict[str, Any]) -> list[torch.Tensor]:
    return [data["hidden"][view] for view in VIEWS] + [data["head"].weight]


@pytest.mark.parametrize("stop_gradient_anchor", [False, True])
@pytest.mark.parametrize("chunk", [1, 3, 10, 64, None])
def test_float64_values_and_gradients_equal_the_full_distribution_path(
    chunk: int | None, stop_gradient_anchor: bool
) -> None:
    data = _inputs()
    scoring = Scoring(0.7, (3, 17), chunk)
    tau = 0.5

    old, old_stats = _old_kl_loss(data, scoring, tau, stop_gradient_anchor)
    expected = torch.autograd.grad(old, _wrt(data), allow_unused=True)

    objective = ContrastivePerception(tau, "kl", stop_gradient_anchor)
    term = objective(_micro_batch(data, scoring), TokenSelector(), 1.0)
    actual = torch.autograd.grad(term.loss, _wrt(data), allow_unused=True)

    assert term.loss.dtype == torch.float64
    torch.testing.assert_close(term.loss, old, rtol=0, atol=1e-10)
    for key, value in old_stats.items():
        torch.testing.assert_close(term.stats[key], value, rtol=0, atol=1e-10)
    assert term.stats["selected_tokens"] == 10
    for name, a, e in zip(("I", "I+", "I-", "head"), actual, expected, strict=True):
        if stop_gradient_anchor and name == "I":
            assert a is None and e is None  # the anchor branch is cut in both paths
            continue
        assert a is not None and e is not None and e.abs().max() > 0, name
        torch.testing.assert_close(a, e, rtol=0, atol=1e-10, msg=name)


def _max_head_rows(objective_class: Any, chunk: int) -> tuple[int, torch.Tensor]:
    """The most positions the LM head saw in one call during the kl objective's forward and
    backward, and the gradient that reached the I+ hidden states."""
    data = _inputs(seed=1, dtype=torch.float32)
    rows: list[int] = []
    data["head"].register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    term = objective_class(0.1, "kl")(
        _micro_batch(data, Scoring(1.0, (5,), chunk)), TokenSelector(), 1.0
    )
    term.loss.backward()
    grad = data["hidden"]["preserving"].grad
    assert grad is not None
    return max(rows), grad


@pytest.mark.parametrize("chunk", [1, 2, 4])
def test_the_head_never_sees_more_than_a_chunk_of_positions(chunk: int) -> None:
    """The bound of :mod:`cppo_lightning.logprobs` holds for the exact KL too, backward included
    (each chunk is recomputed there); building the three ``[S, V]`` distributions at once, as
    the path before did, applies the head to all S = 10 selected positions."""
    largest, grad = _max_head_rows(ContrastivePerception, chunk)
    assert largest <= chunk
    assert grad.abs().sum() > 0


def test_backward_keeps_no_vocabulary_sized_tensor() -> None:
    """Outside each chunk's checkpoint nothing ``[*, V]`` is saved for the backward; in one
    chunk the ``[S, V]`` distributions are (the path before kept them for all S)."""
    torch.manual_seed(0)
    positions, size, vocab = 40, 16, 5000
    head = torch.nn.Linear(size, vocab, bias=False)

    def largest_saved(chunk: int) -> int:
        views = [torch.randn(positions, size, requires_grad=True) for _ in range(3)]
        sizes: list[int] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            d_pos, d_neg = selected_kl(
                head, views[0], (views[1], views[2]), Scoring(1.0, (), chunk)
            )
        (d_pos - d_neg).sum().backward()
        assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in views)
        return max(sizes, default=0)

    assert largest_saved(8) < vocab
    assert largest_saved(positions) >= positions * vocab


def test_no_graph_without_gradients_and_empty_selection() -> None:
    data = _inputs(seed=2, dtype=torch.float32)
    scoring = Scoring(1.0, (3,), 2)
    scores = [ResponseScores(data["hidden"][v], data["head"], data["ids"], scoring) for v in VIEWS]
    mask = data["selected"] & data["mask"].bool()
    with torch.no_grad():
        d_pos, d_neg = scores[0].kl_to((scores[1], scores[2]), mask)
        dists = [s.log_distribution(mask) for s in scores]
    assert d_pos.shape == d_neg.shape == (int(mask.sum()),) and not d_pos.requires_grad
    for d, other in ((d_pos, dists[1]), (d_neg, dists[2])):
        p = dists[0].exp()
        expected = (p * torch.where(p > 0, dists[0] - other, torch.zeros_like(p))).sum(-1)
        torch.testing.assert_close(d, expected, rtol=0, atol=1e-5)
        assert (d >= -1e-6).all()
    none = torch.zeros_like(mask)
    empty = scores[0].kl_to((scores[1],), none)[0]
    assert empty.shape == (0,) and empty.dtype == torch.float32


def test_kl_to_rejects_another_head_or_scoring() -> None:
    data = _inputs(seed=3)
    scores = ResponseScores(data["hidden"]["original"], data["head"], data["ids"], Scoring())
    mask = data["selected"]
    other_head = ResponseScores(
        data["hidden"]["removing"], torch.nn.Linear(SIZE, VOCAB).double(), data["ids"], Scoring()
    )
    other_scoring = ResponseScores(
        data["hidden"]["removing"], data["head"], data["ids"], Scoring(0.5)
    )
    for other in (other_head, other_scoring):
        with pytest.raises(ValueError, match="one model under one scoring"):
            scores.kl_to((other,), mask)
    with pytest.raises(ValueError, match=r"\[S, H\] hidden states of one shape"):
        selected_kl(data["head"], torch.zeros(3, SIZE), (torch.zeros(2, SIZE),), Scoring())
