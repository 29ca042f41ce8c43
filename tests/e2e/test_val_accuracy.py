"""``val/accuracy`` is the mean of the reward term ``model.val_accuracy_term`` names, never the
total reward: a reward without that term is refused before any generation, and null logs no
``val/accuracy``."""

from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cppo_lightning.cli import main
from tests.e2e.test_fit import _fit_args


def _scalars(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def test_a_reward_without_the_term_is_refused_before_any_generation(tmp_path: Path):
    log = tmp_path / "samples.jsonl"
    # _fit_args's reward has one term, `length`; `accuracy` is the default of the setting.
    args = _fit_args(
        tmp_path,
        "--model.val_accuracy_term=accuracy",
        "--rollout.engine=tests.helpers.engines.RecordingEngine",
        f"--rollout.engine.log={log}",
    )
    with pytest.raises(ValueError) as error:
        main(args)
    message = str(error.value)
    assert "model.val_accuracy_term='accuracy'" in message
    assert "its terms: length" in message and "or to null" in message
    assert not log.exists()  # nothing was sampled


def test_null_logs_no_val_accuracy(tmp_path: Path):
    cli = main(_fit_args(tmp_path, "--model.val_accuracy_term=null"))
    scalars = _scalars(cli.trainer.log_dir)
    assert "val/accuracy" not in scalars and "val/accuracy" not in cli.trainer.callback_metrics
    for tag in ("val/reward", "val/response_length"):
        assert [step for step, _ in scalars[tag]] == [0, 2], tag


def test_val_accuracy_is_the_mean_of_the_named_term(tmp_path: Path):
    # `correct` scores the first of every four responses 1 and the others 0, whatever they say;
    # validation samples 4 per prompt, so its mean over every held-out batch is exactly 1/4.
    # The total reward (length + 0.5 * correct) is something else.
    cli = main(
        _fit_args(
            tmp_path,
            "--model.reward.init_args.functions={length: tests.helpers.rewards.length_reward, "
            "correct: tests.helpers.rewards.every_fourth_reward}",
            "--model.reward.init_args.weights={length: 1.0, correct: 0.5}",
            "--model.val_accuracy_term=correct",
            "--model.val_samples=4",
        )
    )
    scalars = _scalars(cli.trainer.log_dir)
    assert scalars["val/accuracy"] == [(0, 0.25), (2, 0.25)]
    assert all(reward > 0.25 for _, reward in scalars["val/reward"])  # 0.125 + mean length / 100
