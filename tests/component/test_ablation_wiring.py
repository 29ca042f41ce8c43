"""CPPO's ablations wired through the module on the embedded model (issue 31).

As in ``test_wiring.py``, every expected value is measured independently of the module: H and H-
come from forwards under explicitly chosen image tensors, and the selection rules are written
out row by row here. A swap of the rankings, or ranking by H under I- instead of I, fails.
"""

from __future__ import annotations

import math

import pytest
import torch

from cppo_lightning.perception import ContrastivePerception
from tests.component.test_wiring import MODEL, TOP_FRACTION, _module, _rollout, _scores


def _shift_rule(h: torch.Tensor, h_neg: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Spec §2 row by row with the raw score: the entropy-shift selection, ties kept."""
    out = torch.zeros_like(mask, dtype=torch.bool)
    for i in range(mask.shape[0]):
        cand = [j for j in range(mask.shape[1]) if mask[i, j] and h_neg[i, j] - h[i, j] > 0]
        if not cand:
            continue
        k = max(1, math.floor(TOP_FRACTION * len(cand)))
        kth = sorted((float(h_neg[i, j] - h[i, j]) for j in cand), reverse=True)[k - 1]
        for j in cand:
            out[i, j] = float(h_neg[i, j] - h[i, j]) >= kth
    return out


def _top(values: torch.Tensor, mask: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """Row by row: the ``budget[i]`` valid positions of highest ``values``, ties kept."""
    out = torch.zeros_like(mask, dtype=torch.bool)
    for i in range(mask.shape[0]):
        valid = [j for j in range(mask.shape[1]) if mask[i, j]]
        if int(budget[i]) == 0:
            continue
        kth = sorted((float(values[i, j]) for j in valid), reverse=True)[int(budget[i]) - 1]
        for j in valid:
            out[i, j] = float(values[i, j]) >= kth
    return out


def _entropies(module, rollout):  # type: ignore[no-untyped-def]
    with torch.no_grad():
        entropy = _scores(module, rollout, None)[1]
        entropy_neg = _scores(module, rollout, rollout.prompts.views.vision_neg)[1]
    return entropy, entropy_neg


@pytest.mark.parametrize("policy", ["update", "rollout"])
def test_entropy_ranking_selects_the_top_entropy_tokens_under_the_original_image(policy):
    """The CPL's tokens are, per response, the highest-H tokens under the original image, as
    many as the entropy-shift rule selects there; not the shift rule's tokens, nor the
    highest-H tokens under I-."""
    module = _module(MODEL, ContrastivePerception(), gate_advantages=False, ranking="entropy")
    rollout = _rollout(module, MODEL)
    if policy == "rollout":
        rollout = module.update.detect_perception_tokens(rollout)
    _, _, term = module.update.compute_loss(rollout, torch.arange(rollout.num_responses))
    entropy, entropy_neg = _entropies(module, rollout)
    mask = rollout.response_mask.bool()
    shift = _shift_rule(entropy, entropy_neg, mask)
    budget = shift.sum(1)
    expected = _top(entropy, mask, budget)
    assert expected.any()
    assert torch.equal(term.mask, expected)
    assert not torch.equal(term.mask, shift), "the entropy ranking gave the shift rule's tokens"
    assert not torch.equal(term.mask, _top(entropy_neg, mask, budget)), "ranked by H(I-)"
    # Its tokens are of higher entropy under I than the shift rule's, on average.
    assert entropy[term.mask].mean() > entropy[shift].mean()


def test_random_ranking_selects_the_shift_rules_count_in_every_response():
    module = _module(MODEL, ContrastivePerception(), gate_advantages=False, ranking="random")
    rollout = _rollout(module, MODEL)
    torch.manual_seed(1)
    _, stats, term = module.update.compute_loss(rollout, torch.arange(rollout.num_responses))
    entropy, entropy_neg = _entropies(module, rollout)
    mask = rollout.response_mask.bool()
    shift = _shift_rule(entropy, entropy_neg, mask)
    assert torch.equal(term.mask.sum(1), shift.sum(1))
    assert not (term.mask & ~mask).any(), "padding selected"
    assert not torch.equal(term.mask, shift)
    assert float(stats["perception/selected_tokens"]) == float(shift.sum())


@pytest.mark.parametrize("gate", [True, False])
def test_without_the_gate_the_views_are_forwarded_for_every_response(gate, monkeypatch):
    """Advantages alternate +1 / -1. With the gate, I- and I+ run on the positive half only and
    the negative responses carry no token; without it both views run on all responses and the
    negative ones carry tokens too."""
    from cppo_lightning import perception

    forwarded: list[int] = []
    score_responses = perception.score_responses

    def recording(*args, **kwargs):  # type: ignore[no-untyped-def]
        forwarded.append(args[3].shape[0])  # response_ids: [rows, L]
        return score_responses(*args, **kwargs)

    monkeypatch.setattr(perception, "score_responses", recording)
    module = _module(MODEL, ContrastivePerception(), gate_advantages=gate)
    rollout = _rollout(module, MODEL, advantages="alternate")
    n = rollout.num_responses
    _, stats, term = module.update.compute_loss(rollout, torch.arange(n))
    negative = rollout.advantages < 0
    assert forwarded == [n // 2 if gate else n] * 2  # the removing view, then the preserving one
    assert float(stats["perception/gated_fraction"]) == pytest.approx(0.5 if gate else 1.0)
    assert bool(term.mask[negative].any()) is not gate
