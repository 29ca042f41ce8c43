"""Resume is a continuation under DDP too: with two CPU processes (gloo), a run resumed from its
step-k checkpoint takes the same steps k+1.. on every rank as the run never interrupted, bit for
bit (each rank's generator states and loader pass are in the checkpoint)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.runs import EVERY_STEP, fit_args
from tests.helpers.steps import read_steps

REPO = Path(__file__).resolve().parents[2]
STEPS = 4


def _run_ddp(root: Path, *extra: str) -> dict[int, dict[int, dict]]:
    """A 2-process ``fit_args`` run (12 training rows: 3 batches of 2 per rank and epoch) that
    records every step on every rank; the records by rank and step."""
    command = [
        sys.executable,
        "-m",
        "cppo_lightning.cli",
        *fit_args(
            root,
            "--trainer.accelerator=cpu",
            "--trainer.devices=2",
            "--trainer.strategy=ddp",
            "--data.dataset.init_args.num_train=12",
            *EVERY_STEP,
            "--trainer.callbacks+=tests.helpers.steps.RecordSteps",
            f"--trainer.callbacks.directory={root}",
            *extra,
            steps=STEPS,
        ),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # A rank waiting on a collective the other never issues would hang: bound it.
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return {rank: read_steps(root, rank) for rank in (0, 1)}


@pytest.fixture(scope="module")
def uninterrupted_ddp(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("uninterrupted-ddp")
    return root, _run_ddp(root)


@pytest.mark.slow
@pytest.mark.parametrize(
    "step", [2, 3], ids=["mid-epoch-at-validation", "epoch-boundary"]
)  # 3 batches per rank and epoch, validation at 2 and 4
def test_a_two_process_run_resumes_bit_for_bit_on_every_rank(tmp_path, uninterrupted_ddp, step):
    """Promise: resuming a 2-process DDP run from its step-k checkpoint gives, on each rank, the
    same logged figures and weights at steps k+1.. as the uninterrupted run."""
    root, full = uninterrupted_ddp
    (checkpoint,) = root.rglob(f"step={step}.ckpt")
    resumed = _run_ddp(tmp_path, f"--ckpt_path={checkpoint}")
    for rank in (0, 1):
        assert sorted(resumed[rank]) == list(range(step + 1, STEPS + 1)), f"rank {rank}"
        for later in resumed[rank]:
            got, want = resumed[rank][later], full[rank][later]
            assert got["metrics"] == want["metrics"], f"rank {rank}, step {later}"
            assert got["weights"] == want["weights"], f"rank {rank}, step {later}"
