"""Unit tests for DAPO's overlong shaping, group filter and truncation mask (arXiv 2503.14476)."""

from __future__ import annotations

import math

import pytest
import torch

from cppo_lightning.losses.dapo import drop_truncated, informative_groups, overlong_penalty
from cppo_lightning.rewards import WeightedReward
from cppo_lightning.rewards_dapo import OverlongPenalty


def test_overlong_penalty_by_hand_paper_setting():
    # L_max = 20480, L_cache = 4096 -> expected = 16384.
    #   |y| = 100     -> 0
    #   |y| = 16384   -> 0 (the boundary belongs to the free zone)
    #   |y| = 18432   -> (16384 - 18432) / 4096 = -0.5
    #   |y| = 20480   -> -1
    #   |y| = 25000   -> -1 (paper's third case)
    lengths = torch.tensor([100, 16384, 18432, 20480, 25000])
    penalty = overlong_penalty(lengths, 20480, 4096)
    torch.testing.assert_close(penalty, torch.tensor([0.0, 0.0, -0.5, -1.0, -1.0]))
    assert penalty.dtype == torch.get_default_dtype()


def test_overlong_penalty_factor_and_small_numbers():
    # L_max = 10, L_cache = 4, factor 2: expected 6;
    # |y| = 7 -> -(1/4) * 2 = -0.5; 9 -> -(3/4) * 2 = -1.5; 12 (beyond L_max) -> -2.
    penalty = overlong_penalty(torch.tensor([6.0, 7.0, 9.0, 12.0]), 10, 4, penalty_factor=2.0)
    torch.testing.assert_close(penalty, torch.tensor([0.0, -0.5, -1.5, -2.0]))


def test_overlong_penalty_is_verls_formula_up_to_max_length():
    # verl's DAPORewardManager: min(-(len - (max - buffer)) / buffer * factor, 0).
    lengths = torch.arange(0, 21, dtype=torch.float64)
    ours = overlong_penalty(lengths, 20, 8, penalty_factor=0.5)
    verl = torch.clamp(-(lengths - 12) / 8 * 0.5, max=0.0)
    torch.testing.assert_close(ours, verl)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_length": 10, "cache_length": 11}, "must not exceed"),
        ({"max_length": 10, "cache_length": 0}, "cache_length must be a positive int"),
        ({"max_length": 0, "cache_length": 1}, "max_length must be a positive int"),
        ({"max_length": 10, "cache_length": 2, "penalty_factor": -1.0}, "penalty_factor"),
    ],
)
def test_overlong_penalty_refuses_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        overlong_penalty(torch.tensor([1]), **kwargs)


def test_overlong_reward_term_through_weighted_reward():
    term = OverlongPenalty(max_length=10, cache_length=4)
    reward = WeightedReward(
        functions={"overlong": term, "one": lambda c, **_: [1.0] * len(c)},
        weights={"overlong": 1.0, "one": 1.0},
    )
    total, terms = reward(["a", "b", "c"], {"response_length": [3, 8, 10], "answer": ["x"] * 3})
    # 1 + [0, -(8 - 6) / 4, -1] = [1, 0.5, 0]
    torch.testing.assert_close(total, torch.tensor([1.0, 0.5, 0.0]))
    torch.testing.assert_close(terms["overlong"], torch.tensor([0.0, -0.5, -1.0]))


def test_overlong_reward_term_names_the_missing_column():
    term = OverlongPenalty(max_length=10, cache_length=4)
    with pytest.raises(KeyError, match="response_length"):
        term(["a"], answer=["x"])
    with pytest.raises(ValueError, match="one token count per response"):
        term(["a", "b"], response_length=[1])
    with pytest.raises(ValueError, match="must not exceed"):
        OverlongPenalty(max_length=4, cache_length=10)


def test_informative_groups_by_hand():
    # G = 3: [1,1,1] all correct -> drop; [0,0,0] all wrong -> drop; [1,0,1] -> keep;
    # [0.9, 0.9, 1.0] (totals differ) -> keep.
    values = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.9, 0.9, 1.0])
    assert informative_groups(values, 3).tolist() == [False, False, True, True]


def test_informative_groups_accuracy_vs_total_reward():
    # All correct, format differs: the total 0.9 acc + 0.1 fmt varies, accuracy does not;
    # DAPO filters on accuracy and drops the group.
    accuracy = torch.tensor([1.0, 1.0])
    fmt = torch.tensor([1.0, 0.0])
    assert informative_groups(accuracy, 2).tolist() == [False]
    assert informative_groups(0.9 * accuracy + 0.1 * fmt, 2).tolist() == [True]


def test_informative_groups_edge_cases():
    assert informative_groups(torch.tensor([1, 2, 2, 2]), 2).tolist() == [True, False]  # ints
    assert informative_groups(torch.tensor([0.0, math.nan, 1.0, 0.0]), 2).tolist() == [False, True]
    assert informative_groups(torch.tensor([math.inf, 0.0]), 2).tolist() == [False]
    assert informative_groups(torch.tensor([3.0, 3.0]), 1).tolist() == [True, True]  # verl keeps
    assert informative_groups(torch.zeros(0), 4).tolist() == []
    with pytest.raises(ValueError, match="multiple"):
        informative_groups(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="group_size"):
        informative_groups(torch.zeros(4), 0)
    with pytest.raises(ValueError, match="1-D"):
        informative_groups(torch.zeros(2, 2), 2)


def test_drop_truncated():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    out = drop_truncated(mask, torch.tensor([False, True, False]))
    assert out.tolist() == [[1, 1, 0], [0, 0, 0], [1, 0, 0]]
    assert out.dtype == mask.dtype
    with pytest.raises(ValueError, match="truncated"):
        drop_truncated(mask, torch.tensor([True]))
