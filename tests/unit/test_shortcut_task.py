"""The language-shortcut testbed's splits (src/cppo_lightning/data/shortcut.py): the training prior
holds at rate ``prior`` within sampling error, the counter-prior split never has the prior answer,
and the picture always agrees with the answer (looking is always right)."""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

import pytest
import yaml

from cppo_lightning.data import ShortcutShapes
from cppo_lightning.data.shortcut import OTHER_KINDS, PRIOR_KIND, PRIORS
from cppo_lightning.data.synthetic import COLORS, KINDS, SHAPES

REPO = Path(__file__).resolve().parents[2]
QUESTION = re.compile(r"What color is the (\w+)\?")


def _named_shape(row: dict) -> str:
    match = QUESTION.fullmatch(row["question"])
    assert match, row["question"]
    return match.group(1)


def _within(count: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    return abs(count / n - p) <= sigmas * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("prior", [0.9, 0.6])
def test_train_split_has_the_prior_at_rate_p(prior: float) -> None:
    source = ShortcutShapes(
        num_train=2000, num_val=8, seed=3, prior=prior, share=0.5, num_counter=8
    )
    rows = source.samples("train")
    kinds = Counter(r["kind"] for r in rows)
    assert set(kinds) <= set(KINDS)
    assert _within(kinds[PRIOR_KIND], len(rows), 0.5)  # share
    prior_rows = [r for r in rows if r["kind"] == PRIOR_KIND]
    follows = sum(r["answer"] == PRIORS[_named_shape(r)] for r in prior_rows)
    assert _within(follows, len(prior_rows), prior), (follows, len(prior_rows))
    # Off the prior, the answer is one of the three other colours, each about equally often.
    off = Counter(r["answer"] for r in prior_rows if r["answer"] != PRIORS[_named_shape(r)])
    assert set(off) <= set(COLORS)
    # The other kinds are the plain task's, in about equal numbers.
    others = [kinds[k] for k in OTHER_KINDS]
    assert all(_within(c, sum(others), 1 / len(OTHER_KINDS)) for c in others), kinds


def test_validation_split_shares_the_training_prior() -> None:
    source = ShortcutShapes(num_train=8, num_val=1500, seed=4, prior=0.8, share=1.0, num_counter=8)
    rows = source.samples("validation")
    assert {r["kind"] for r in rows} == {PRIOR_KIND}  # share 1.0: prior questions only
    follows = sum(r["answer"] == PRIORS[_named_shape(r)] for r in rows)
    assert _within(follows, len(rows), 0.8)


def test_counter_split_never_has_the_prior_answer_and_the_image_has_the_answer() -> None:
    rows = ShortcutShapes(num_counter=600, seed=5).samples("counter")
    assert len(rows) == 600
    named = Counter()
    for row in rows:
        shape = _named_shape(row)
        named[shape] += 1
        assert row["kind"] == PRIOR_KIND
        assert row["answer"] != PRIORS[shape]
        # Exactly one shape of the named type, and its colour is the answer.
        (only,) = [s for s in row["shapes"] if s["shape"] == shape]
        assert only["color"] == row["answer"]
        assert row["solution"].endswith(f"\\boxed{{{row['answer']}}}")
    assert set(named) == set(SHAPES)
    answers = Counter(row["answer"] for row in rows)
    assert set(answers) == set(COLORS)  # every colour is some shape's non-prior answer


def test_prior_rows_show_their_answer_in_the_image() -> None:
    rows = ShortcutShapes(num_train=300, seed=6, prior=0.9).samples("train")
    for row in rows:
        if row["kind"] == PRIOR_KIND:
            (only,) = [s for s in row["shapes"] if s["shape"] == _named_shape(row)]
            assert only["color"] == row["answer"]


def test_splits_are_deterministic_and_distinct() -> None:
    data = ShortcutShapes(num_train=20, num_val=10, num_counter=10, seed=1).load()
    assert set(data) == {"train", "validation", "counter"}
    assert (data["train"].num_rows, data["validation"].num_rows, data["counter"].num_rows) == (
        20,
        10,
        10,
    )
    again = ShortcutShapes(num_train=20, num_val=10, num_counter=10, seed=1).load()
    for split in data:
        assert again[split]["solution"] == data[split]["solution"]
    assert data["train"]["solution"][:10] != data["validation"]["solution"]
    other = ShortcutShapes(num_train=20, num_val=10, num_counter=10, seed=2).load()
    assert other["counter"]["solution"] != data["counter"]["solution"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prior": 1.5}, "prior must be in [0, 1], got 1.5"),
        ({"share": -0.1}, "share must be in [0, 1], got -0.1"),
        ({"num_counter": 0}, "num_counter must be >= 1, got 0"),
        ({"num_train": 0}, "num_train must be >= 1, got 0"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        ShortcutShapes(**kwargs)


def test_unknown_split_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown split 'test'"):
        ShortcutShapes().samples("test")


def test_eval_sets_measure_the_training_prior() -> None:
    """configs/eval/shortcut*.yaml draw from the same source settings as the testbed's overlay, so
    the in-distribution set has the training prior and the counter set its complement."""
    overlay = yaml.safe_load((REPO / "configs/testbeds/shortcut.yaml").read_text())
    train_args = overlay["data"]["dataset"]["init_args"]
    assert overlay["data"]["dataset"]["class_path"] == "cppo_lightning.data.ShortcutShapes"
    sets = {}
    for name in ("shortcut", "shortcut-counter"):
        spec = yaml.safe_load((REPO / f"configs/eval/{name}.yaml").read_text())
        assert spec["name"] == name
        assert spec["dataset"]["class_path"] == "cppo_lightning.data.ShortcutShapes"
        sets[name] = spec
        for key, value in spec["dataset"]["init_args"].items():
            assert train_args.get(key, value) == value, (name, key)
    assert sets["shortcut"]["split"] == "validation"
    assert sets["shortcut-counter"]["split"] == "counter"
    evaluation = [
        c for c in overlay["trainer"]["callbacks"] if c["class_path"].endswith("Evaluation")
    ]
    assert evaluation[0]["init_args"]["sets"] == [
        "configs/eval/shortcut.yaml",
        "configs/eval/shortcut-counter.yaml",
    ]


def test_the_overlay_keeps_base_callbacks_but_the_evaluation_sets():
    """A list in a later config replaces the earlier one: the overlay restates base.yaml's
    callbacks, which must stay the same but for the Evaluation's sets and images."""
    base = yaml.safe_load((REPO / "configs/base.yaml").read_text())["trainer"]["callbacks"]
    overlay = yaml.safe_load((REPO / "configs/testbeds/shortcut.yaml").read_text())
    mine = overlay["trainer"]["callbacks"]
    assert [c["class_path"] for c in mine] == [c["class_path"] for c in base]
    for theirs, ours in zip(base, mine, strict=True):
        if ours["class_path"].endswith("Evaluation"):
            changed = {"sets", "images"}
            keep = {k: v for k, v in ours["init_args"].items() if k not in changed}
            assert keep == {k: v for k, v in theirs["init_args"].items() if k not in changed}
        else:
            assert ours == theirs
