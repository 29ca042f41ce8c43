"""A dotted path in a config that does not import is named with the reason in one line, and the
working directory is importable under the ``cppo`` console script as under ``python -m``."""

from __future__ import annotations

import os
import sys

import pytest

from cppo_lightning.cli import import_failures, import_working_directory, main
from tests.helpers.runs import BASE


@pytest.fixture
def packages(tmp_path, monkeypatch):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "__init__.py").write_text("")
    (tmp_path / "mine" / "rewards.py").write_text("def score(completions, **_):\n    return []\n")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "__init__.py").write_text("import not_installed_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (
            "expects a function or a callable class: No module named 'absent'. Got value: "
            "absent.rewards.score",
            "cannot import 'absent.rewards.score': No module named 'absent' (code in the working "
            "directory is importable; else add its folder to PYTHONPATH)",
        ),
        (
            "Got value: mine.nothing.score",
            "cannot import 'mine.nothing.score': No module named 'mine.nothing'",
        ),
        (
            "Got value: mine.rewards.other",
            "cannot import 'mine.rewards.other': mine.rewards has no 'other'",
        ),
        (
            "Problem with given class_path 'broken.Thing':\n  No module named ...",
            "cannot import 'broken.Thing': No module named 'not_installed_anywhere' (raised while "
            "importing broken)",
        ),
    ],
)
def test_the_reason_is_the_import_retried(packages, message, reason):
    assert import_failures(message) == [reason]


def test_paths_that_import_are_not_named(packages):
    message = "Got value: mine.rewards.score ... given class_path 'torch.optim.AdamW'"
    assert import_failures(message) == []


def test_the_reason_comes_before_the_usage_text(capsys):
    with pytest.raises(SystemExit) as raised:
        main(["fit", "--config", BASE, "--model.perception_loss=absent.losses.Mine"])
    assert raised.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == (
        "cppo: cannot import 'absent.losses.Mine': No module named 'absent' (code in the "
        "working directory is importable; else add its folder to PYTHONPATH)"
    )
    assert lines[1].startswith("usage: ")


def test_the_working_directory_goes_first_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", os.getcwd())])
    import_working_directory()
    assert sys.path[0] == str(tmp_path)
    import_working_directory()
    assert sys.path.count(str(tmp_path)) == 1
    monkeypatch.setattr(sys, "path", ["", *sys.path[1:]])  # `python -m` / `-c`: '' is the cwd
    import_working_directory()
    assert sys.path[0] == "" and str(tmp_path) not in sys.path
