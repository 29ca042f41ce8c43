"""The docs name only what exists: every repository path, link and anchor, ``cppo`` flag, config
key and ``cppo_lightning`` name in README.md, docs/*.md and the comments of configs/**/*.yaml
(:mod:`tests.helpers.doc_references`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.doc_references import REPO, References, documents


@pytest.fixture(scope="module")
def references() -> References:
    return References()


# Files whose problems their owners are fixing (the spec citations of issue 34, item 6): strict, so
# the entry must go when the file is fixed.
PENDING: dict[str, str] = {}  # a file that may fail for now -> why (strict xfail)


def _marked(path: Path) -> object:
    name = str(path.relative_to(REPO))
    if name in PENDING:
        return pytest.param(
            path, id=name, marks=pytest.mark.xfail(strict=True, reason=PENDING[name])
        )
    return pytest.param(path, id=name)


@pytest.mark.parametrize("path", [_marked(p) for p in documents()])
def test_the_docs_name_only_what_exists(path: Path, references: References):
    problems = references.check_file(path)
    assert not problems, "\n".join(problems)


# Each line below names one thing that does not exist; the line after it, the same thing right.
TYPOS = """
# A page

```bash
cppo fit --config configs/base.yaml --model.kl_coeff 0
cppo fit --config configs/base.yaml --model.kl_coef 0
cppo fit --config configs/experiments/grpoo.yaml
cppo fit --config configs/experiments/grpo.yaml
cppo fit --config configs/base.yaml \\
    --data.batchsize 4
cppo fit --config configs/base.yaml \\
    --data.batch_size 4
cppo evaluate builtin:tiny-qwen2.5-vl --eval configs/eval/synthetic.yaml --sample 4 --output x
cppo evaluate builtin:tiny-qwen2.5-vl --eval configs/eval/synthetic.yaml --samples 4 --output x
cppo study --config configs/base.yaml --method grpo --trainer.max_steps=4
cppo study --config configs/base.yaml --methods grpo --trainer.max_steps=4
cppo export a.ckpt out --dtypes bfloat16
cppo export a.ckpt out --dtype bfloat16
python benchmarks/model_step.py --sizes 3b
python benchmarks/model_step.py --size 3b
```

See [the results](results.md#no-such-heading).
See [the results](results.md#how-the-default-was-chosen).
See [a page](no-such-page.md).
See [a page](method.md).
Set `model.perception_loss.init_args.taux`.
Set `model.perception_loss.init_args.tau`.
Set `model.perception_loss.init_args.gamma_`.
Set `model.perception_loss.init_args.gamma`.
Set `data.dataset.init_args.train.pth`.
Set `data.dataset.init_args.train.path`.
Set `model.lora.rank`.
Set `model.lora.r`.
Read `cppo_lightning.callbacks.Evaluatoin`.
Read `cppo_lightning.callbacks.Evaluation`.
Run tests/e2e/test_fit.py::test_no_such_test.
Run tests/config/test_doc_references.py::test_the_docs_name_only_what_exists.
As the team's spec §3 says.
As docs/method.md §3 says.

```yaml
model:
  perception_loss:
    class_path: cppo_lightning.perception.ContrastivePerception
    init_args: {tau: 0.1, divergance: k3}
```

```yaml
model:
  perception_loss:
    class_path: cppo_lightning.perception.ContrastivePerception
    init_args: {tau: 0.1, divergence: k3}
```
"""


def test_a_wrong_name_is_reported_and_the_right_one_is_not(references: References):
    problems = references.check_text(TYPOS, REPO / "docs" / "typos.md")
    lines = TYPOS.splitlines()
    wrong = {
        number
        for number, line in enumerate(lines, start=1)
        if any(
            word in line
            for word in (
                "coeff",
                "grpoo",
                "batchsize",
                "--sample ",
                "--method ",
                "--dtypes",
                "--sizes",
                "no-such",
                "taux",
                "gamma_",
                ".pth",
                "rank",
                "Evaluatoin",
                "test_no_such_test",
                "spec §",
            )
        )
    }
    reported = {int(problem.split(":")[1]) for problem in problems}
    yaml_block = next(n for n, line in enumerate(lines, start=1) if line == "```yaml")
    assert reported == wrong | {yaml_block}, "\n".join(problems)
    assert any("divergance" in problem for problem in problems)
