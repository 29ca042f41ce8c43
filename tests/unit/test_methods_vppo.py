"""VPPO's components (:mod:`cppo_lightning.methods.vppo`) by hand, on hand-built batches.

The visual dependency of a token is the authors' k3 of ``d = removed_logp - old_logp`` (the
rollout policy's log-prob under the masked image minus under the original):
``exp(d) - d - 1``. It is not symmetric in the two images, which is what lets these tests pin
the direction (a swap of old and removed must fail them)::

    d = +ln 2   (masking doubles the token's probability)  -> 2 - ln 2 - 1    = 0.306853
    d = -ln 2   (masking halves it)                        -> 1/2 + ln 2 - 1  = 0.193147
    d = -2 ln 2 (masking quarters it)                      -> 1/4 + 2 ln 2 - 1 = 0.636294
    d = 0                                                  -> 0
    swapped, d -> -d: 0.193147, 0.306853, 1.613706 (= 4 - 2 ln 2 - 1), 0
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from cppo_lightning.methods import DependencyShaping, DependentTokens, EntropyPenalty
from cppo_lightning.perception import MicroBatch
from cppo_lightning.records import RolloutBatch

LN2 = math.log(2.0)
UP = 2 - LN2 - 1  # k3(+ln 2) = 0.306853
DOWN = 0.5 + LN2 - 1  # k3(-ln 2) = 0.193147
QUARTER = 0.25 + 2 * LN2 - 1  # k3(-2 ln 2) = 0.636294
OLD = math.log(0.5)


def close(actual: torch.Tensor, expected, *, atol: float = 1e-6) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0.0)


def rollout(d: list[list[float]], mask: list[list[int]], advantages) -> RolloutBatch:  # type: ignore[no-untyped-def]
    """N responses with old_logp = ln 0.5 everywhere and removed_logp = old_logp + d."""
    d_t = torch.tensor(d, dtype=torch.float64)
    old = torch.full_like(d_t, OLD)
    n, length = d_t.shape
    return RolloutBatch(
        prompts=None,  # type: ignore[arg-type]  # the components read no prompt
        prompt_index=torch.zeros(n, dtype=torch.long),
        response_ids=torch.zeros(n, length, dtype=torch.long),
        response_mask=torch.tensor(mask),
        texts=[""] * n,
        rewards=torch.zeros(n),
        reward_terms={},
        group_size=n,
        advantages=torch.as_tensor(advantages, dtype=torch.float64),
        old_logp=old,
        removed_logp=old + d_t,
    )


def micro(batch: RolloutBatch, logp: torch.Tensor | None = None, agg: str = "token-mean"):  # type: ignore[no-untyped-def]
    """The MicroBatch the step hands a component (scores unused by these components)."""
    assert batch.advantages is not None and batch.old_logp is not None
    return MicroBatch(
        scores=None,  # type: ignore[arg-type]
        logp=batch.old_logp if logp is None else logp,
        response_ids=batch.response_ids,
        response_mask=batch.response_mask,
        advantages=batch.advantages,
        view_scores=None,  # type: ignore[arg-type]
        loss_agg=agg,
        rollout=batch,
    )


def _swapped(batch: RolloutBatch) -> RolloutBatch:
    """The same batch with the two images' log-probs exchanged (the wiring bug to catch)."""
    return dataclasses.replace(batch, old_logp=batch.removed_logp, removed_logp=batch.old_logp)


def test_defaults_are_the_authors_scripts():
    tokens, shaping, penalty = DependentTokens(), DependencyShaping(), EntropyPenalty()
    assert (tokens.top_fraction, tokens.normalise) == (0.4, "all")
    assert shaping.scale_min == 0.9
    assert (penalty.coef, penalty.name) == (0.06, "entropy")
    for component in (tokens, shaping):
        assert component.needs == frozenset({"old_logp", "removed_logp"})


# Row 0: d = [0, +ln2, -ln2, -2ln2] -> dependency [0, UP, DOWN, QUARTER]; 4 valid tokens.
# Row 1: d = [-ln2, +ln2, -20 (padding)] -> [DOWN, UP, 10 (clamped; padding)]; 2 valid tokens.
TOKENS_D = [[0.0, LN2, -LN2, -2 * LN2], [-LN2, LN2, -20.0, 0.0]]
TOKENS_MASK = [[1, 1, 1, 1], [1, 1, 0, 0]]


def test_the_most_dependent_tokens_of_each_response_by_hand():
    # top_fraction 0.4: row 0 keeps ceil(1.6) = 2: QUARTER (0, 3) and UP (0, 1); row 1 keeps
    # ceil(0.8) = 1: UP (1, 1); the padding (1, 2) with dependency 10 is never a candidate.
    # With old and removed swapped, row 0 would keep (0, 3) and (0, 2), row 1 (1, 0).
    #   fraction 3/6; threshold = mean(row 0's lowest kept UP, row 1's UP) = UP;
    #   selected mean (QUARTER + UP + UP) / 3 = 1.25 / 3 = 0.416667 (UP + DOWN = 0.5 exactly);
    #   rejected (0 + DOWN + DOWN) / 3 = 0.128765;
    #   dependency mean (0 + UP + DOWN + QUARTER + DOWN + UP) / 6 = 1.636294 / 6 = 0.272716.
    batch = rollout(TOKENS_D, TOKENS_MASK, [1.0, 1.0])
    weight, stats = DependentTokens()(micro(batch))
    assert weight.dtype == torch.bool
    assert weight.tolist() == [[False, True, False, True], [False, True, False, False]]
    swapped, _ = DependentTokens()(micro(_swapped(batch)))
    assert swapped.tolist() == [[False, False, True, True], [True, False, False, False]]
    close(stats["fraction"], 0.5)
    close(stats["threshold"], UP)
    close(stats["selected_mean"], 1.25 / 3)
    close(stats["rejected_mean"], 2 * DOWN / 3)
    close(stats["dependency_mean"], (1.0 + QUARTER) / 6)


# The rollout batch of the shaping tests: 4 responses, the mini-batch is responses 1, 2, 3.
#   r0: d = -2 ln 2 everywhere  -> score QUARTER (the highest, but not in the mini-batch)
#   r1: d = +ln 2 (2 tokens)    -> score UP
#   r2: d = -ln 2 (3 tokens)    -> score DOWN
#   r3: d = 0 (2 tokens)        -> score 0
SHAPING_D = [[-2 * LN2] * 3, [LN2, LN2, 0.0], [-LN2] * 3, [0.0, 0.0, 0.0]]
SHAPING_MASK = [[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 0]]
MINI = torch.tensor([1, 2, 3])
# Mini-batch bounds low = 0 (r3), high = UP (r1):
#   u = [1, DOWN / UP, 0] = [1, 0.629446, 0]; mean(u) = 0.543149
#   top = 0.9 + 0.1 / (0.543149 + 1e-8) = 1.084112
#   scales = [top, 0.9 + 0.629446 * (top - 0.9), 0.9] = [1.084112, 1.015888, 0.9], mean 1.
U2 = DOWN / UP
TOP = 0.9 + 0.1 / ((1 + U2) / 3 + 1e-8)
SCALES = [TOP, 0.9 + U2 * (TOP - 0.9), 0.9]


def test_the_more_dependent_response_gets_the_larger_advantage_by_hand():
    # advantages [5, 1, -1, 2] -> mini-batch [1 * 1.084112, -1 * 1.015888, 2 * 0.9]. With old
    # and removed swapped r2 (DOWN -> UP) would be the most dependent and get the top scale.
    batch = rollout(SHAPING_D, SHAPING_MASK, [5.0, 1.0, -1.0, 2.0])
    advantages, stats = DependencyShaping()(batch, MINI)
    close(advantages, [SCALES[0], -SCALES[1], 2 * SCALES[2]])
    swapped, _ = DependencyShaping()(_swapped(batch), MINI)
    assert swapped[0] < -swapped[1]  # the swap would favour r2: the test tells them apart
    close(stats["score_mean"], (UP + DOWN + 0.0) / 3)
    close(stats["score_low"], 0.0)
    close(stats["score_high"], UP)  # r0's QUARTER is outside the mini-batch
    close(stats["scale_max"], TOP)
    close(stats["scale_mean"], 1.0, atol=1e-7)


def test_per_token_advantages_are_scaled_row_by_row():
    batch = rollout(SHAPING_D, SHAPING_MASK, torch.ones(4, 3))
    advantages, _ = DependencyShaping()(batch, MINI)
    close(advantages, [[s] * 3 for s in SCALES])


def test_equal_dependencies_leave_the_advantages_alone():
    # high - low = 0 <= 1e-6: every scale is 1 (the authors' guard).
    batch = rollout([[LN2, LN2]] * 3, [[1, 1]] * 3, [1.0, -2.0, 3.0])
    advantages, stats = DependencyShaping()(batch, torch.arange(3))
    close(advantages, [1.0, -2.0, 3.0])
    close(stats["scale_max"], 1.0)


def test_entropy_penalty_by_hand():
    # logp = [[ln .5, ln .25, pad], [ln .5, pad, pad]]:
    #   token-mean of -logp = (ln 2 + 2 ln 2 + ln 2) / 3 = 4 ln 2 / 3 = 0.924196; x 0.06.
    #   d/dlogp = -0.06 / 3 at each valid token: descending the loss raises the sampled tokens'
    #   log-probs, i.e. lowers the entropy estimate (a penalty, not a bonus).
    #   seq-mean-token-mean: ((ln 2 + 2 ln 2) / 2 + ln 2) / 2 = 1.25 ln 2.
    logp = torch.tensor([[-LN2, -2 * LN2, 0.0], [-LN2, 0.0, 0.0]], dtype=torch.float64)
    logp.requires_grad_()
    batch = rollout([[0.0] * 3] * 2, [[1, 1, 0], [1, 0, 0]], [1.0, 1.0])
    loss, stats = EntropyPenalty()(micro(batch, logp))
    close(loss, 0.06 * 4 * LN2 / 3)
    close(stats["estimate"], 4 * LN2 / 3)
    close(stats["loss"], 0.06 * 4 * LN2 / 3)
    loss.backward()
    assert logp.grad is not None
    close(logp.grad, [[-0.02, -0.02, 0.0], [-0.02, 0.0, 0.0]])
    seq, _ = EntropyPenalty(coef=1.0)(micro(batch, logp, agg="seq-mean-token-mean"))
    close(seq, 1.25 * LN2)


def test_missing_needs_and_bad_settings_are_named():
    batch = rollout(TOKENS_D, TOKENS_MASK, [1.0, 1.0])
    bare = dataclasses.replace(batch, removed_logp=None)
    with pytest.raises(RuntimeError, match="removed_logp"):
        DependentTokens()(micro(bare))
    with pytest.raises(RuntimeError, match="removed_logp"):
        DependencyShaping()(bare, torch.arange(2))
    with pytest.raises(ValueError, match=r"model\.token_weighting\.top_fraction"):
        DependentTokens(top_fraction=0.0)
    with pytest.raises(ValueError, match=r"model\.advantage\.scale_min"):
        DependencyShaping(scale_min=1.5)
    with pytest.raises(ValueError, match="coef must be >= 0"):
        EntropyPenalty(coef=-0.1)
