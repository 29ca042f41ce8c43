"""The lambda schedule and the detection-precision helpers, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from cppo_lightning.callbacks import CPLWeight
from cppo_lightning.callbacks.monitor import (
    RHOS,
    baseline_counts,
    detection_precision,
    perception_word_labels,
    top_entropy_tokens,
)
from cppo_lightning.detection import TokenSelector


def test_constant_weight_with_linear_warmup():
    weight = CPLWeight(value=0.01, warmup_steps=4)
    # 0.01 * t / 4 during warm-up, then 0.01.
    assert [weight.weight(t) for t in range(6)] == pytest.approx(
        [0.0, 0.0025, 0.005, 0.0075, 0.01, 0.01]
    )


def test_linear_and_cosine_decay_reach_the_final_value():
    linear = CPLWeight(value=0.02, schedule="linear", final_value=0.0, total_steps=10)
    assert linear.weight(0) == pytest.approx(0.02)
    assert linear.weight(5) == pytest.approx(0.01)  # halfway
    assert linear.weight(10) == linear.weight(20) == pytest.approx(0.0)
    cosine = CPLWeight(value=0.02, schedule="cosine", final_value=0.01, warmup_steps=2)
    # total from trainer.max_steps = 12: progress (t - 2) / 10; at t = 7, 0.5 -> cos = 0.
    assert cosine.weight(7, total_steps=12) == pytest.approx(0.015)
    assert cosine.weight(4, total_steps=12) == pytest.approx(
        0.01 + 0.01 * 0.5 * (1 + math.cos(math.pi * 0.2))
    )
    with pytest.raises(ValueError, match="needs total_steps"):
        CPLWeight(schedule="linear").weight(3)


def test_weight_state_round_trips():
    weight = CPLWeight()
    weight.step = 7
    fresh = CPLWeight()
    fresh.load_state_dict(weight.state_dict())
    assert fresh.step == 7


class CharTokenizer:
    """One token per character (ids are code points)."""

    def batch_decode(self, ids: list[list[int]]) -> list[str]:
        return ["".join(chr(i) for i in row) for row in ids]


def _encode(text: str, length: int) -> tuple[list[int], list[int]]:
    ids = [ord(c) for c in text]
    return ids + [0] * (length - len(ids)), [1] * len(ids) + [0] * (length - len(ids))


def test_perception_word_labels_mark_whole_words_only():
    texts = ["I see 3 reds.", "red 13"]
    encoded = [_encode(t, 14) for t in texts]
    ids = torch.tensor([e[0] for e in encoded])
    mask = torch.tensor([e[1] for e in encoded])
    labels = perception_word_labels(CharTokenizer(), ids, mask, [["3", "reds"], ["red", "3"]])
    # Row 0: "3" at 6, "reds" at 8-11. Row 1: "red" at 0-2; the "3" inside "13" is not a word.
    assert labels[0].nonzero().flatten().tolist() == [6, 8, 9, 10, 11]
    assert labels[1].nonzero().flatten().tolist() == [0, 1, 2]


def test_detection_precision_against_the_pool():
    labels = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 1]], dtype=torch.bool)
    selected = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    pool = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)  # row 1 gated out
    precision, base_rate = detection_precision(selected, labels, pool)
    assert precision == pytest.approx(1 / 2)  # one of two selected tokens is labelled
    assert base_rate == pytest.approx(2 / 4)  # two of the pool's four tokens are labelled


def test_only_the_reasoning_is_labelled():
    text = "<think>I see 2 red shapes.</think>\\boxed{2}"
    ids, mask = _encode(text, len(text))
    labels = perception_word_labels(
        CharTokenizer(), torch.tensor([ids]), torch.tensor([mask]), [["2"]]
    )
    # The "2" of the reasoning, not the boxed answer that repeats it.
    assert labels[0].nonzero().flatten().tolist() == [text.index("2")]
    everywhere = perception_word_labels(
        CharTokenizer(), torch.tensor([ids]), torch.tensor([mask]), [["2"]], end_of_reasoning=None
    )
    assert everywhere[0].nonzero().flatten().tolist() == [text.index("2"), text.rindex("2")]


def test_top_entropy_tokens_take_each_responses_budget_from_its_pool():
    entropy = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.9, 0.8, 0.1, 0.2]])
    pool = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)  # row 0's last is padding
    chosen = top_entropy_tokens(entropy, pool, torch.tensor([2, 0]))
    assert chosen.tolist() == [[False, True, True, False], [False] * 4]


def test_baselines_share_detections_budget():
    labels = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 0]], dtype=torch.bool)
    pool = torch.ones(2, 4, dtype=torch.bool)
    selected = torch.tensor([[1, 0, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)  # budgets 1 and 2
    entropy = torch.tensor([[0.1, 2.0, 0.2, 0.3], [0.5, 0.4, 0.3, 0.2]])
    removed = entropy + torch.tensor([[3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 2.0, 1.0]])
    counts = baseline_counts(selected, labels, pool, entropy, removed, TokenSelector())
    # Random: 1 * 2/4 + 2 * 1/4 labelled tokens expected among 3 chosen.
    assert counts["random"].tolist() == pytest.approx([1.0, 3.0])
    # Highest entropy: token 1 of row 0 (labelled); tokens 0 and 1 of row 1 (not labelled).
    assert counts["entropy"].tolist() == [1.0, 3.0]
    assert set(counts) == {"random", "entropy", *(f"rho{rho}" for rho in RHOS)}
    # rho 0.5 of the entropy-raising tokens: row 0 has one (kept), row 1 two (one kept: token 2).
    assert counts["rho0.5"].tolist() == [2.0, 2.0]
