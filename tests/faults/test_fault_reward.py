"""A reward term that fails on every response stops the run after saving, with its first error,
instead of training on zeros; an occasional failure still only scores 0."""

from __future__ import annotations

import pytest
import torch

from cppo_lightning.cli import main
from cppo_lightning.rewards import RewardFailure, WeightedReward
from tests.helpers.rewards import length_reward, raising_reward
from tests.helpers.runs import fit_args, run_recorded


def test_a_reward_that_always_fails_stops_the_run_after_saving(tmp_path, caplog):
    """Promise: with a reward that raises on every response, `cppo fit` stops with RewardFailure
    naming the term and its first error (reward.stop_after=2 batches in a row), after saving a
    loadable ``reward-failure-step=<k>.ckpt``; it does not run to max_steps."""
    args = fit_args(
        tmp_path,
        "--model.reward.init_args.functions={broken: tests.helpers.rewards.raising_reward}",
        "--model.reward.init_args.weights={broken: 1.0}",
        "--model.val_accuracy_term=broken",
        "--model.reward.init_args.stop_after=2",
        steps=5,
    )
    failure = r"'broken' failed on every response.*always fails"
    with pytest.raises(RewardFailure, match=failure), caplog.at_level("INFO"):
        main(args)
    (checkpoint,) = tmp_path.rglob("reward-failure-step=*.ckpt")
    assert "state_dict" in torch.load(checkpoint, weights_only=False)
    assert f"--ckpt_path {checkpoint}" in caplog.text


def test_the_reward_failure_checkpoint_resumes_with_a_fixed_reward(tmp_path):
    """Promise: the checkpoint saved on RewardFailure resumes: the same command with the reward
    fixed (a reward is not a hyper-parameter the checkpoint pins) continues from the saved step
    and runs to max_steps."""
    stopped = tmp_path / "stopped"
    broken = [
        "--model.reward.init_args.functions={broken: tests.helpers.rewards.raising_reward}",
        "--model.reward.init_args.weights={broken: 1.0}",
        "--model.val_accuracy_term=broken",
        "--model.reward.init_args.stop_after=2",
    ]
    with pytest.raises(RewardFailure):
        main(fit_args(stopped, *broken, steps=3))
    (checkpoint,) = stopped.rglob("reward-failure-step=*.ckpt")
    saved_step = torch.load(checkpoint, weights_only=True)["global_step"]
    assert saved_step < 3
    resumed = run_recorded(tmp_path / "resumed", f"--ckpt_path={checkpoint}", steps=3)
    assert sorted(resumed) == list(range(saved_step + 1, 4))


def _sometimes(completions: list[str], **_: object) -> list[float]:
    if completions == ["bad"]:
        raise ValueError("bad response")
    if "bad" in completions:
        raise ValueError("a bad response in the batch")
    return [1.0] * len(completions)


def test_failures_on_some_responses_never_stop_and_the_count_resets():
    """Only a term failing on *every* response of consecutive calls counts toward stop_after: a
    call with one good response resets it."""
    reward = WeightedReward({"t": _sometimes}, {"t": 1.0}, stop_after=2)
    for _ in range(5):
        reward(["bad", "good"], {})  # one response fails: never a stop
    assert reward.failed_calls["t"] == 0
    reward(["bad"], {})
    assert reward.failed_calls["t"] == 1
    reward(["good"], {})
    assert reward.failed_calls["t"] == 0
    reward(["bad"], {})
    with pytest.raises(RewardFailure, match="bad response"):
        reward(["bad"], {})


def test_stop_after_must_be_positive_or_null():
    with pytest.raises(ValueError, match=r"reward\.stop_after must be >= 1"):
        WeightedReward({"t": length_reward}, {"t": 1.0}, stop_after=0)
    WeightedReward({"t": raising_reward}, {"t": 1.0}, stop_after=None)(["x"] * 3, {})


@pytest.mark.parametrize("bad", [float("nan"), None], ids=["nan", "none"])
def test_a_reward_that_returns_nan_or_none_for_every_response_also_stops(bad):
    """Promise: returning NaN (or None) for every response counts as failing, like raising: the
    second such call in a row (stop_after=2) raises RewardFailure naming the term."""
    reward = WeightedReward(
        {"t": lambda completions, **_: [bad] * len(completions)}, {"t": 1.0}, stop_after=2
    )
    with pytest.warns(RuntimeWarning):
        reward(["a", "b"], {})
    with pytest.raises(RewardFailure, match=r"'t' failed on every response.*non-finite score"):
        reward(["a", "b"], {})
