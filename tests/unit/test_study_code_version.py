"""A study run's record names the code that made it (src/cppo_lightning/study/runs.py's
code_version): the checkout's commit, and whether tracked files differ from it."""

from __future__ import annotations

import subprocess
from pathlib import Path

from cppo_lightning.study import runs, settings


def _git(folder: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(folder), *args], capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def test_code_version_is_the_commit_and_whether_tracked_files_changed(tmp_path, monkeypatch):
    monkeypatch.setattr(settings, "repo_root", lambda: tmp_path)
    assert runs.code_version() is None  # not a checkout
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.txt").write_text("one\n")
    _git(tmp_path, "add", "a.txt")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    head = _git(tmp_path, "rev-parse", "HEAD")
    assert runs.code_version() == {"commit": head, "dirty": False}
    (tmp_path / "new.txt").write_text("untracked\n")  # runs' outputs are untracked: not dirty
    assert runs.code_version() == {"commit": head, "dirty": False}
    (tmp_path / "a.txt").write_text("two\n")
    assert runs.code_version() == {"commit": head, "dirty": True}


def test_code_version_is_none_without_git(tmp_path, monkeypatch):
    monkeypatch.setattr(settings, "repo_root", lambda: tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))  # no git on the PATH
    assert runs.code_version() is None
