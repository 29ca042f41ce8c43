"""avg@k, the std over sample sets, the 95% interval, pass@k and answers kept, against numbers
worked out by hand; and the rank-reduction property the in-fit callback relies on."""

from __future__ import annotations

import math

import pytest
import torch

from cppo_lightning.evaluation.metrics import (
    NO_REFERENCE,
    Z95,
    ConditionStats,
    majority_answer,
)

# 4 prompts x 2 samples; 1 = correct.
CORRECT = [[1, 1], [1, 0], [0, 0], [1, 1]]


def _stats(correct=CORRECT, categories=("a", "b"), cats=("a", "a", "b", "b")) -> ConditionStats:
    stats = ConditionStats(2, categories)
    for hits, category in zip(correct, cats, strict=True):
        stats.add(hits, [1, 0], [10, 20], category=category)
    return stats


def test_avg_at_k_std_over_sample_sets_interval_and_pass_at_k_by_hand():
    summary = _stats().summary()
    # avg@k: 5 correct of 8 responses.
    assert summary["accuracy"] == pytest.approx(5 / 8)
    # Sample sets: set 0 = first samples (1, 1, 0, 1) -> 3/4; set 1 = (1, 0, 0, 1) -> 2/4.
    # Their sample std: |3/4 - 2/4| / sqrt(2).
    assert summary["std"] == pytest.approx(0.25 / math.sqrt(2))
    # Per-prompt accuracies p = (1, .5, 0, 1), mean .625; squared deviations .140625, .015625,
    # .390625, .140625 sum to .6875; sample variance .6875 / 3; half-width 1.96 * sd / sqrt(4).
    half = Z95 * math.sqrt(0.6875 / 3) / 2
    assert summary["ci95"][0] == pytest.approx(0.625 - half)
    assert summary["ci95"][1] == 1.0  # 0.625 + 0.469 clipped to 1
    # pass@k: 3 of 4 prompts have a correct sample.
    assert summary["pass_at_k"] == pytest.approx(0.75)
    assert summary["format_rate"] == pytest.approx(0.5)
    assert summary["response_length"] == pytest.approx(15.0)
    # Categories: a = prompts 0, 1 (3 of 4 correct); b = prompts 2, 3 (2 of 4).
    assert summary["by_category"] == {"a": 0.75, "b": 0.5}
    assert summary["n"] == 4 and summary["k"] == 2
    assert summary["answer_kept"] is None  # nothing compared


def test_single_sample_has_zero_std_and_a_single_prompt_an_uninformative_interval():
    stats = ConditionStats(1)
    stats.add([True], [True], [3])
    summary = stats.summary()
    assert summary["std"] == 0.0
    assert summary["ci95"] == [0.0, 1.0]
    assert summary["accuracy"] == 1.0


def test_answer_kept_compares_majorities_with_the_reference():
    stats = ConditionStats(3)
    stats.add([0, 0, 0], [1, 1, 1], [1, 1, 1], majority="3", reference="3")
    stats.add([0, 0, 0], [1, 1, 1], [1, 1, 1], majority=None, reference="4")
    stats.add([0, 0, 0], [1, 1, 1], [1, 1, 1], majority=None, reference=None)  # both no answer
    stats.add([0, 0, 0], [1, 1, 1], [1, 1, 1], majority="1", reference=NO_REFERENCE)
    assert stats.summary()["answer_kept"] == pytest.approx(2 / 3)


def test_majority_answer_breaks_ties_by_first_sample():
    assert majority_answer(["2", "3", "3", "2"]) == "2"
    assert majority_answer(["5", None, None]) is None
    assert majority_answer([]) is None


def test_sums_of_two_shards_give_the_figures_of_the_whole():
    whole = _stats()
    first = _stats(CORRECT[:1], cats=("a",))
    second = _stats(CORRECT[1:], cats=("a", "b", "b"))
    reduced = ConditionStats(2, ("a", "b")).load_tensor(first.to_tensor() + second.to_tensor())
    assert reduced.summary() == whole.summary()


def test_bad_sizes_and_categories_are_refused():
    with pytest.raises(ValueError, match="k must be >= 1"):
        ConditionStats(0)
    stats = ConditionStats(2, ["a"])
    with pytest.raises(ValueError, match="needs 2 samples"):
        stats.add([1], [1], [1])
    with pytest.raises(ValueError, match="unknown category"):
        stats.add([1, 1], [1, 1], [1, 1], category="z")
    with pytest.raises(ValueError, match="expected"):
        stats.load_tensor(torch.zeros(3))


def test_an_empty_condition_has_nan_figures():
    summary = ConditionStats(2).summary()
    assert summary["n"] == 0 and math.isnan(summary["accuracy"])
