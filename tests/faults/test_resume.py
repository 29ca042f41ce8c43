"""Resume is a continuation: a run resumed from its step-k checkpoint takes the same steps
k+1.. as the run that was never interrupted, bit for bit on CPU."""

from __future__ import annotations

import pytest

from tests.helpers.runs import EVERY_STEP, run_recorded


@pytest.mark.parametrize(
    "step",
    [2, 3],
    ids=["mid-epoch-at-validation", "epoch-boundary"],  # 3 batches per epoch, val at 2, 4
)
def test_resumed_run_takes_the_same_steps_bit_for_bit(tmp_path, uninterrupted, step):
    """Promise: resuming from the step-k checkpoint (mid-epoch, or at the end of an epoch) gives
    the same losses, rewards and weights at steps k+1.. as the uninterrupted run, with a
    held-out validation (which samples) in between."""
    root, full = uninterrupted
    (checkpoint,) = root.rglob(f"step={step}.ckpt")
    resumed = run_recorded(tmp_path, *EVERY_STEP, f"--ckpt_path={checkpoint}")
    assert sorted(resumed) == list(range(step + 1, 6))
    for later in resumed:
        assert resumed[later]["metrics"] == full[later]["metrics"], f"step {later}"
        assert resumed[later]["weights"] == full[later]["weights"], f"step {later}"


def test_a_run_of_two_optimizer_steps_per_rollout_batch_resumes_bit_for_bit(tmp_path):
    """Promise: the default's shape, each rollout batch split into mini-batches (two optimizer
    steps per batch here, as base.yaml's 8 prompts in mini-batches of 4), resumes from a
    checkpoint at a rollout batch's end to the same steps as the run that went on."""
    two = "--model.mini_batch_size=1"  # batches of 2 prompts: steps 2, 4, 6 end batches
    full = run_recorded(tmp_path / "full", *EVERY_STEP, two, steps=6)
    assert sorted(full) == [2, 4, 6]
    (checkpoint,) = (tmp_path / "full").rglob("step=2.ckpt")
    resumed = run_recorded(
        tmp_path / "resumed", *EVERY_STEP, two, f"--ckpt_path={checkpoint}", steps=6
    )
    assert sorted(resumed) == [4, 6]
    for later in resumed:
        assert resumed[later]["metrics"] == full[later]["metrics"], f"step {later}"
        assert resumed[later]["weights"] == full[later]["weights"], f"step {later}"
