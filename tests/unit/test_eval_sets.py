"""Every configs/eval/*.yaml reads small local files in its benchmark's layout: questions with
lettered options, letter answers, categories, bad rows counted; multiple-choice items graded by
letter, free-form ones by math-verify; bad set descriptions fail with what to change."""

from __future__ import annotations

from pathlib import Path

import pytest

from cppo_lightning.data import DatasetSpec
from cppo_lightning.evaluation.engine import grade
from cppo_lightning.evaluation.sets import (
    EvalSet,
    load_eval_set,
    option_letter,
    parse_options,
    with_options,
)
from cppo_lightning.policy import load_processor
from tests.helpers.benchmarks import LAYOUTS

REPO = Path(__file__).resolve().parents[2]
EVAL = REPO / "configs" / "eval"


@pytest.fixture(scope="module")
def processor():
    return load_processor("builtin:tiny-qwen2.5-vl")


def _local(name: str, root: Path) -> EvalSet:
    """The shipped config of ``name`` with its hub dataset replaced by a local file."""
    eval_set = load_eval_set(str(EVAL / f"{name}.yaml"))
    eval_set.dataset = DatasetSpec(path=str(LAYOUTS[name](root)))
    return eval_set


# benchmark -> (expected (question tail, answer, category) of the two good rows)
EXPECTED = {
    "mathvista": [
        ("(C) 5", "C", "figure question answering"),
        ("What fraction is shaded?", "0.5", "math word problem"),
    ],
    "mathverse": [("C:90", "B", "Text Dominant"), ("", "12", "Vision Only")],
    "wemath": [("(E) No correct answer", "B", "Area of circles"), ("(B) 14", "A", "Perimeter")],
    "logicvista": [("C. z", "A, C", "inductive"), ("B. y", "B", "spatial")],
    "dynamath": [("B. 2", "A", "graph theory"), ("Value of f(2)?", "1/4", "algebra")],
    "mathvision": [("(E) E", "C", "metric geometry"), ("How many?", "7", "counting")],
    "mmmu-pro-vision": [("correct option.", "B", "Art"), ("correct option.", "A", "Math")],
    "geometry3k": [("<image>Find x.", "12", ""), ("<image>Find y.", "3\\sqrt{2}", "")],
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_each_benchmark_config_reads_its_layout(name, tmp_path, processor):
    rows, report = _local(name, tmp_path).load(processor)
    assert report.rows == 3 and dict(report) == {"unreadable image": 1}, report.summary()
    got = [(rows[i]["question"], rows[i]["answer"], rows[i]["category"]) for i in range(2)]
    for (question, answer, category), (tail, want_answer, want_category) in zip(
        got, EXPECTED[name], strict=True
    ):
        assert question.endswith(tail), question
        assert answer == want_answer
        assert category == want_category
    assert len(set(rows["prompt_id"])) == 2


def test_every_shipped_eval_config_parses():
    names = sorted(p.stem for p in EVAL.glob("*.yaml"))
    assert names == sorted([*LAYOUTS, "synthetic", "shortcut", "shortcut-counter"])
    for name in names:
        eval_set = load_eval_set(str(EVAL / f"{name}.yaml"))
        assert eval_set.name == name


def test_multiple_choice_is_graded_by_letter_or_option_text(tmp_path, processor):
    rows, _ = _local("mathvista", tmp_path).load(processor)
    eval_set = _local("mathvista", tmp_path)
    row = rows[0]  # options 3, 4, 5; the answer 5 is (C)
    texts = ["<think>x</think>\\boxed{C}", "\\boxed{(C)}", "\\boxed{5}", "\\boxed{B}", "\\boxed{4}"]
    columns = {k: [row[k]] * len(texts) for k in row if k != "image"}
    correct, formatted = grade(eval_set, texts, columns)
    assert correct == [True, True, True, False, False]
    assert formatted == [True, False, False, False, False]


def test_free_form_is_graded_by_math_verify(tmp_path, processor):
    eval_set = _local("geometry3k", tmp_path)
    rows, _ = eval_set.load(processor)
    row = rows[1]  # 3\sqrt{2}
    texts = ["\\boxed{\\sqrt{18}}", "\\boxed{4.2426}", "\\boxed{3}", "no box"]
    columns = {k: [row[k]] * len(texts) for k in row if k != "image"}
    correct, _ = grade(eval_set, texts, columns)
    assert correct == [True, False, False, False]


def test_options_are_read_from_lists_list_strings_and_lettered_text():
    assert parse_options(["3", " 4 "]) == ["3", "4"]
    assert parse_options("['Monet', 'Manet']") == ["Monet", "Manet"]
    assert parse_options("A. 200.96;B. 3215.36;C. 6280;D. 32; E. No correct answer") == [
        "200.96",
        "3215.36",
        "6280",
        "32",
        "No correct answer",
    ]
    assert parse_options("(A) red (B) blue") == ["red", "blue"]
    assert parse_options(None) == parse_options([]) == parse_options("") == []
    with pytest.raises(ValueError, match="cannot read the options"):
        parse_options("red or blue")
    assert option_letter("(b)", ["x", "y"]) == "B"
    assert option_letter("Y", ["x", "y"]) == "B"
    with pytest.raises(ValueError, match="not among"):
        option_letter("z", ["x", "y"])
    assert with_options("Q?", ["x", "y"]) == "Q?\nChoices:\n(A) x\n(B) y"


def test_a_set_without_its_image_or_answer_column_names_what_to_set(tmp_path, processor):
    eval_set = _local("logicvista", tmp_path)
    eval_set.image_column = "picture"
    with pytest.raises(ValueError, match=r"no column 'picture' for image_column .*columns"):
        eval_set.load(processor)
    eval_set = _local("logicvista", tmp_path)
    eval_set.answer_column = "solution"
    with pytest.raises(ValueError, match="no column 'solution' for answer_column"):
        eval_set.load(processor)


def test_answers_outside_the_options_are_dropped_and_counted(tmp_path, processor):
    eval_set = _local("mathvista", tmp_path)
    eval_set.answer_column = "query"  # "q" is none of the options, nor an answer of free rows
    rows, report = eval_set.load(processor)
    assert report["answer not among the options"] == 1
    assert len(rows) == 1


def test_inline_specs_and_bad_descriptions(tmp_path):
    path = LAYOUTS["logicvista"](tmp_path)
    eval_set = load_eval_set(f"{{path: {path}, category_column: skill}}")
    assert eval_set.name == "logicvista" and eval_set.category_column == "skill"
    assert isinstance(eval_set.dataset, DatasetSpec) and eval_set.dataset.path == str(path)
    with pytest.raises(ValueError, match="no such file"):
        load_eval_set(str(tmp_path / "missing.yaml"))
    with pytest.raises(ValueError, match="inline dataset spec"):
        load_eval_set("{split: test}")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndataset: {path: a.jsonl}\nanswer_colum: y\n")
    with pytest.raises(ValueError, match="answer_colum"):
        load_eval_set(str(bad))
    with pytest.raises(ValueError, match="letters, digits"):
        EvalSet("a b", DatasetSpec(path="x.jsonl"))
    with pytest.raises(ValueError, match="has no \\{question\\}"):
        EvalSet("a", DatasetSpec(path="x.jsonl"), question_template="Solve it.")


def test_the_fingerprint_follows_the_settings_not_the_caches():
    one = load_eval_set(str(EVAL / "synthetic.yaml"))
    two = load_eval_set(str(EVAL / "synthetic.yaml"))
    before = one.fingerprint()
    one.raw_rows()  # fills the synthetic source's cache
    assert one.fingerprint() == before == two.fingerprint()
    two.instruction = "Answer."
    assert two.fingerprint() != before


def test_the_synthetic_eval_set_is_the_default_runs_validation_split():
    import yaml

    base = yaml.safe_load((REPO / "configs" / "base.yaml").read_text())
    eval_set = load_eval_set(str(EVAL / "synthetic.yaml"))
    source = base["data"]["dataset"]
    assert type(eval_set.dataset).__name__ == source["class_path"].rsplit(".", 1)[1]
    assert vars(eval_set.dataset) | source["init_args"] == vars(eval_set.dataset)
    assert eval_set.split == "validation"
    assert eval_set.max_new_tokens == base["rollout"]["max_new_tokens"]


def test_a_relative_eval_set_resolves_under_the_checkout_from_another_folder(tmp_path, monkeypatch):
    """base.yaml names configs/eval/synthetic.yaml; cppo fit run from another folder still finds
    it in the checkout (the working directory is looked at first: a file there wins)."""
    from cppo_lightning.evaluation.sets import CHECKOUT, load_eval_set

    monkeypatch.chdir(tmp_path)
    shipped = load_eval_set("configs/eval/synthetic.yaml")
    assert shipped.name == "synthetic"
    assert shipped.source == str(CHECKOUT / "configs/eval/synthetic.yaml")
    own = tmp_path / "configs" / "eval" / "synthetic.yaml"
    own.parent.mkdir(parents=True)
    own.write_text(
        (CHECKOUT / "configs/eval/synthetic.yaml")
        .read_text()
        .replace("name: synthetic", "name: mine")
    )
    assert load_eval_set("configs/eval/synthetic.yaml").name == "mine"
    with pytest.raises(ValueError, match="no such file under the working directory"):
        load_eval_set("configs/eval/none.yaml")
