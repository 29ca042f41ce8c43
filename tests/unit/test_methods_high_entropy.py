"""The 80/20 rule's component (:class:`cppo_lightning.methods.HighEntropyTokens`) by hand.

The micro-batch's forward is a plain LM head (the identity, vocabulary 4) on hidden states that
are the logits themselves, so every token's entropy is known in closed form:

    [0, 0, 0, 0]          uniform over 4          H = ln 4   = 1.386294
    [0, 0, 0, -1e4]       uniform over 3          H = ln 3   = 1.098612
    [ln 2, 0, 0, -1e4]    (1/2, 1/4, 1/4)         H = 1.5 ln 2 = 1.039721
    [0, 0, -1e4, -1e4]    uniform over 2          H = ln 2   = 0.693147
    [0, -1e4, -1e4, -1e4] one token               H = 0
"""

from __future__ import annotations

import math

import pytest
import torch

from cppo_lightning.logprobs import ResponseScores, Scoring
from cppo_lightning.methods import HighEntropyTokens
from cppo_lightning.perception import MicroBatch

LN2, LN3, LN4 = math.log(2.0), math.log(3.0), math.log(4.0)
BIG = -1e4
LOGITS = {
    LN4: [0.0, 0.0, 0.0, 0.0],
    LN3: [0.0, 0.0, 0.0, BIG],
    1.5 * LN2: [LN2, 0.0, 0.0, BIG],
    LN2: [0.0, 0.0, BIG, BIG],
    0.0: [0.0, BIG, BIG, BIG],
}
# Entropies by position; (0, 3) is padding with the highest entropy of all, never selectable.
ENTROPY = [[LN2, LN4, 0.0, LN4], [1.5 * LN2, LN3, 0.0, 0.0]]
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])


def close(actual: torch.Tensor, expected, *, atol: float = 1e-6) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0.0)


def micro_batch() -> MicroBatch:
    hidden = torch.tensor([[LOGITS[h] for h in row] for row in ENTROPY], dtype=torch.float64)
    hidden.requires_grad_()
    head = torch.nn.Linear(4, 4, bias=False, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(torch.eye(4, dtype=torch.float64))
    ids = torch.zeros(2, 4, dtype=torch.long)
    scores = ResponseScores(hidden, head, ids, Scoring())
    return MicroBatch(
        scores=scores,
        logp=scores.logps(),
        response_ids=ids,
        response_mask=MASK,
        advantages=torch.tensor([1.0, -1.0], dtype=torch.float64),
        view_scores=lambda view, rows: scores,
    )


def test_the_entropies_are_the_ones_derived_by_hand():
    close(micro_batch().scores.entropy(), ENTROPY)


def test_defaults_are_the_authors():
    tokens = HighEntropyTokens()
    assert (tokens.rho, tokens.rule, tokens.per_response, tokens.normalise) == (
        0.2,
        "count",
        False,
        "selected",
    )
    assert tokens.reads_entropy and tokens.needs == frozenset()


def test_the_top_fifth_of_the_micro_batch_by_hand():
    # 7 valid tokens, rho 0.2 -> k = ceil(1.4) = 2: ln 4 at (0, 1) and ln 3 at (1, 1); the
    # padding at (0, 3) (ln 4) is not a candidate.
    #   fraction 2/7; threshold ln 3; selected mean (ln 4 + ln 3) / 2 = 1.242453;
    #   rejected: ln 2, 0, 1.5 ln 2, 0, 0 -> 2.5 ln 2 / 5 = 0.5 ln 2 = 0.346574;
    #   entropy mean (ln 2 + ln 4 + 1.5 ln 2 + ln 3) / 7 = (4.5 ln 2 + ln 3) / 7 = 0.602539.
    weight, stats = HighEntropyTokens(rho=0.2)(micro_batch())
    assert weight.dtype == torch.bool and not weight.requires_grad
    assert weight.tolist() == [[False, True, False, False], [False, True, False, False]]
    close(stats["fraction"], 2 / 7)
    close(stats["threshold"], LN3)
    close(stats["selected_mean"], (LN4 + LN3) / 2)
    close(stats["rejected_mean"], 0.5 * LN2)
    close(stats["entropy_mean"], (4.5 * LN2 + LN3) / 7)
    assert all(not v.requires_grad for v in stats.values())


def test_one_pool_for_the_batch_or_one_per_response_by_hand():
    # rho 0.4. Batch: k = ceil(2.8) = 3 -> ln 4, ln 3, 1.5 ln 2; threshold 1.5 ln 2; row 0's
    # ln 2 is left out. Per response: row 0 k = ceil(1.2) = 2 -> ln 4, ln 2; row 1
    # k = ceil(1.6) = 2 -> ln 3, 1.5 ln 2; threshold mean(ln 2, 1.5 ln 2) = 1.25 ln 2.
    batch, stats = HighEntropyTokens(rho=0.4)(micro_batch())
    assert batch.tolist() == [[False, True, False, False], [True, True, False, False]]
    close(stats["threshold"], 1.5 * LN2)
    rows, stats = HighEntropyTokens(rho=0.4, per_response=True)(micro_batch())
    assert rows.tolist() == [[True, True, False, False], [True, True, False, False]]
    close(stats["threshold"], 1.25 * LN2)
    close(stats["fraction"], 4 / 7)


def test_the_quantile_rule_is_trls_threshold():
    # TRL: threshold = quantile(valid, 1 - rho) (linear). rho 0.6: the valid entropies sorted
    # [0, 0, 0, ln2, 1.5 ln2, ln3, ln4], level 0.4 -> position 2.4 -> 0 + 0.4 * ln 2 = 0.277;
    # >= it: ln 2, 1.5 ln 2, ln 3, ln 4 (4 tokens). The count rule keeps exactly ceil(4.2) = 5:
    # one of the three tied zeros too, the earliest, (0, 2).
    quantile, _ = HighEntropyTokens(rho=0.6, rule="quantile")(micro_batch())
    assert quantile.tolist() == [[True, True, False, False], [True, True, False, False]]
    count, _ = HighEntropyTokens(rho=0.6)(micro_batch())
    assert count.tolist() == [[True, True, True, False], [True, True, False, False]]


def test_bad_settings_name_the_config_key():
    with pytest.raises(ValueError, match=r"model\.token_weighting\.rho"):
        HighEntropyTokens(rho=1.5)
    with pytest.raises(ValueError, match=r"model\.token_weighting\.rule"):
        HighEntropyTokens(rule="topk")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"model\.token_weighting\.normalise"):
        HighEntropyTokens(normalise="valid")  # type: ignore[arg-type]
