"""Rewards: boxed-answer extraction, accuracy, format and their weighted sum."""

from __future__ import annotations

import pytest
import torch

from cppo_lightning.rewards import (
    WeightedReward,
    accuracy_reward,
    extract_boxed,
    format_reward,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>x</think>\\boxed{3}", "3"),
        ("\\boxed{1} then \\boxed{2}", "2"),  # the last one counts
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
        ("\\boxed{3", None),  # cut before the answer closed
        ("no answer", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_accuracy_is_exact_match_after_normalisation():
    completions = ["\\boxed{Red}", "\\boxed{ 3 }", "\\boxed{4}", "3"]
    assert accuracy_reward(completions, answer=["red", "3", "3", "3"]) == [1.0, 1.0, 0.0, 0.0]


def test_format_needs_think_then_boxed():
    completions = [
        "<think>I see 2 circles.</think>\\boxed{2}",
        "<think>multi\nline</think> so \\boxed{2}.",
        "\\boxed{2}",  # no reasoning
        "<think>unclosed \\boxed{2}",
        "<think>a</think> no box",
    ]
    assert format_reward(completions) == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_weighted_sum_is_the_papers_default():
    reward = WeightedReward()
    completions = ["<think>a</think>\\boxed{2}", "<think>a</think>\\boxed{3}", "\\boxed{2}", "x"]
    total, terms = reward(completions, {"answer": ["2"] * 4})
    # 0.9 * accuracy + 0.1 * format: [0.9+0.1, 0+0.1, 0.9+0, 0]
    torch.testing.assert_close(total, torch.tensor([1.0, 0.1, 0.9, 0.0]))
    assert terms["accuracy"].tolist() == [1, 0, 1, 0] and terms["format"].tolist() == [1, 1, 0, 0]


def test_weights_must_match_functions():
    with pytest.raises(ValueError, match="missing weights for \\['format'\\]"):
        WeightedReward(weights={"accuracy": 1.0})
    with pytest.raises(ValueError, match="is not callable"):
        WeightedReward(functions={"a": 3}, weights={"a": 1.0})  # type: ignore[dict-item]


def test_reward_returning_the_wrong_count_is_named():
    reward = WeightedReward(
        functions={"short": lambda completions, **_: [1.0]}, weights={"short": 1}
    )
    with pytest.raises(ValueError, match="'short' returned 1 scores for 2 responses"):
        reward(["a", "b"], {})
