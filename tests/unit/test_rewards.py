"""Rewards: boxed-answer extraction, accuracy, format and their weighted sum."""

from __future__ import annotations

import math
import threading
import warnings

import pytest
import torch

from cppo_lightning.data.synthetic import build_dataset
from cppo_lightning.rewards import (
    WeightedReward,
    _parse_math,
    accuracy_reward,
    extract_boxed,
    format_reward,
    normalize_answer,
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


# --- math-verify grading ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "truth"),
    [
        ("<think>half</think>\\boxed{0.5}", "\\frac{1}{2}"),
        ("\\boxed{\\frac{1}{2}}", "0.5"),
        ("\\boxed{\\dfrac{1}{2}}", "1/2"),
        ("\\boxed{\\sqrt{12}}", "2\\sqrt{3}"),
        ("so the side is \\boxed{14}", "\\boxed{14}"),  # Geometry3K-style boxed ground truth
        ("\\boxed{14}", "<think>a solution</think> \\boxed{14}"),
        ("\\boxed{14.0}", "14"),
        ("\\boxed{14}", "14.0"),
        ("\\boxed{60^\\circ}", "60"),
        ("\\boxed{14 \\text{ cm}}", "14"),
        ("\\boxed{x = 3}", "3"),
        ("\\boxed{(x-1)(x+1)}", "x^2-1"),
        ("\\boxed{Yes}", "yes"),  # words: exact match after normalisation
        ("\\boxed{\\text{yes}}", "yes"),
        ("\\boxed{Red.}", "red"),
        ("\\boxed{(B)}", "B"),  # multiple choice: the letter, however it is wrapped
        ("\\boxed{b}", "B"),
        ("\\boxed{\\text{(C)}}", "C"),
        ("\\boxed{D.}", "(D)"),
        ("\\boxed{3}", 3),  # a non-string answer column
    ],
)
def test_accuracy_accepts_equivalent_answers(response, truth):
    assert accuracy_reward([response], answer=[truth]) == [1.0]


@pytest.mark.parametrize(
    ("response", "truth"),
    [
        ("\\boxed{15}", "14"),
        ("\\boxed{0.51}", "\\frac{1}{2}"),
        ("\\boxed{2\\sqrt{2}}", "2\\sqrt{3}"),
        ("\\boxed{14}", "\\boxed{15}"),
        ("the answer is 14", "14"),  # no boxed answer
        ("\\boxed{14", "14"),  # cut before the box closed
        ("\\boxed{}", "14"),
        ("\\boxed{no}", "yes"),
        ("\\boxed{on}", "no"),  # would be n*o == o*n if words went to sympy
        ("\\boxed{circle red}", "red circle"),
        ("\\boxed{sey}", "yes"),
        ("\\boxed{fourteen}", "14"),
        ("\\boxed{C}", "B"),
        ("\\boxed{(B) 14}", "B"),  # a letter with more text is not that choice
        ("\\boxed{14}", "B"),
        ("\\boxed{B}", "14"),
    ],
)
def test_accuracy_rejects_wrong_answers(response, truth):
    assert accuracy_reward([response], answer=[truth]) == [0.0]


def test_accuracy_from_a_non_main_thread():
    """math-verify's signal.alarm timeout raises outside the main thread unless disabled."""
    completions = ["\\boxed{0.5}", "\\boxed{\\sqrt{12}}", "\\boxed{15}", "\\boxed{yes}", "x"]
    answers = ["\\frac{1}{2}", "2\\sqrt{3}", "14", "Yes", "1"]
    expected = [1.0, 1.0, 0.0, 1.0, 0.0]
    results: list[object] = []

    def score() -> None:
        try:
            results.append(accuracy_reward(completions, answer=answers))
        except BaseException as exc:
            results.append(exc)

    thread = threading.Thread(target=score)
    thread.start()
    thread.join()
    assert results == [expected]
    assert accuracy_reward(completions, answer=answers) == expected  # and the main thread


@pytest.mark.parametrize(
    "answer",
    [
        "9^{9^{9^{9}}}",  # sympy compares it for ever
        "(10^{10})!",
        "(x+1)^{1000}",
        "\\binom{10^{10}}{5000000}",  # evaluated while parsing
        "\\sum_{i=1}^{10^{10}} i^{i}",
        "1" * 2000,
    ],
)
def test_answers_that_can_hang_sympy_are_not_parsed(answer):
    # Without the main thread's alarm nothing would stop these; they fall back to exact match.
    assert _parse_math(answer, timeout=None) is None
    assert accuracy_reward([f"\\boxed{{{answer}}}"], answer=["3"]) == [0.0]
    assert accuracy_reward([f"\\boxed{{{answer}}}"], answer=[answer]) == [1.0]


@pytest.mark.parametrize("answer", ["2^{10}", "10!", "(x+1)^{2}", "\\frac{\\pi}{3}", "14 cm"])
def test_ordinary_answers_are_parsed(answer):
    assert _parse_math(answer, timeout=None)


def test_synthetic_task_grades_as_exact_match():
    """On the synthetic task (short words and integers) the grader is exact match."""
    rows = build_dataset(100, seed=0)
    answers = [str(a) for a in rows["answer"]]
    assert accuracy_reward(list(rows["solution"]), answer=answers) == [1.0] * len(answers)
    distinct = sorted(set(answers))
    assert len(distinct) > 5  # words and numbers
    completions, truths, expected = [], [], []
    for truth in answers:
        for guess in distinct:
            completions.append(f"<think>.</think>\\boxed{{{guess}}}")
            truths.append(truth)
            expected.append(float(normalize_answer(guess) == normalize_answer(truth)))
    assert accuracy_reward(completions, answer=truths) == expected


# --- failing reward terms --------------------------------------------------------------------


def _fails_on_bad(completions, *, answer, **_):
    """1.0 per response, but raises on a response "bad"; checks columns stay aligned."""
    if "bad" in completions:
        raise KeyError("bad response")
    return [float(c == a) for c, a in zip(completions, answer, strict=True)]


def test_a_raising_term_scores_zero_only_where_it_fails():
    reward = WeightedReward(
        functions={"flaky": _fails_on_bad, "format": format_reward},
        weights={"flaky": 1.0, "format": 0.5},
    )
    completions = ["a", "bad", "c", "x"]
    with pytest.warns(RuntimeWarning, match="'flaky' raised KeyError: 'bad response'"):
        total, terms = reward(completions, {"answer": ["a", "bad", "c", "y"]})
    assert terms["flaky"].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert terms["format"].tolist() == [0.0] * 4
    torch.testing.assert_close(total, torch.tensor([1.0, 0.0, 1.0, 0.0]))
    assert reward.last_errors == {"flaky": 1, "format": 0}
    assert reward.total_errors == {"flaky": 1, "format": 0}


def test_a_term_raising_everywhere_scores_zero_counts_and_warns_once():
    def broken(completions, **_):
        raise RuntimeError("reward server down")

    reward = WeightedReward(
        functions={"broken": broken, "accuracy": accuracy_reward},
        weights={"broken": 0.5, "accuracy": 1.0},
    )
    completions, columns = ["\\boxed{1}", "\\boxed{2}", "\\boxed{3}"], {"answer": ["1"] * 3}
    with pytest.warns(RuntimeWarning, match="'broken' raised RuntimeError: reward server down"):
        total, terms = reward(completions, columns)
    assert terms["broken"].tolist() == [0.0, 0.0, 0.0]
    torch.testing.assert_close(total, torch.tensor([1.0, 0.0, 0.0]))
    assert reward.last_errors == {"broken": 3, "accuracy": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise here
        reward(completions[:2], {"answer": ["1"] * 2})
    assert reward.last_errors == {"broken": 2, "accuracy": 0}
    assert reward.total_errors == {"broken": 5, "accuracy": 0}


def test_non_finite_scores_are_zero_and_counted():
    reward = WeightedReward(
        functions={"nan": lambda completions, **_: [1.0, math.nan, -math.inf, None, 0.5]},
        weights={"nan": 1.0},
    )
    with pytest.warns(RuntimeWarning, match="'nan' returned a non-finite score nan"):
        total, terms = reward(["a"] * 5, {})
    assert terms["nan"].tolist() == [1.0, 0.0, 0.0, 0.0, 0.5]
    assert torch.isfinite(total).all()
    assert reward.last_errors == {"nan": 3}
    reward(["a"] * 5, {})
    assert reward.total_errors == {"nan": 6}


def test_errors_reset_on_a_clean_call():
    reward = WeightedReward(functions={"flaky": _fails_on_bad}, weights={"flaky": 1.0})
    with pytest.warns(RuntimeWarning):
        reward(["bad", "a"], {"answer": ["bad", "a"]})
    assert reward.last_errors == {"flaky": 1}
    _, terms = reward(["a", "b"], {"answer": ["a", "a"]})
    assert terms["flaky"].tolist() == [1.0, 0.0]
    assert reward.last_errors == {"flaky": 0} and reward.total_errors == {"flaky": 1}


def test_exact_match_reward_compares_normalised_text_only():
    from cppo_lightning.rewards import exact_match_reward

    completions = ["<think>.</think>\\boxed{ Red }", "\\boxed{total. So 01}", "\\boxed{3.0}", "3"]
    assert exact_match_reward(completions, answer=["red", "1", "3", "3"]) == [1.0, 0.0, 0.0, 0.0]
    # math-verify grades the second and third as correct.
    assert accuracy_reward(completions[1:3], answer=["1", "3"]) == [1.0, 1.0]
