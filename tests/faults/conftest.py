"""Shared by the fault tests: one uninterrupted 5-step run, checkpointed at every step."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.runs import EVERY_STEP, run_recorded


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, dict]]:
    """The run resumed runs are compared with: its root (checkpoints ``step=k.ckpt``) and its
    record by step."""
    root = tmp_path_factory.mktemp("uninterrupted")
    return root, run_recorded(root, *EVERY_STEP)
