"""The Evaluation callback inside fit: it logs eval/<benchmark>/<images>/... before the first
update and on its schedule, agrees with ``cppo evaluate`` on the same policy, and leaves the
training run exactly as it is without it."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cppo_lightning.callbacks import Evaluation
from cppo_lightning.cli import main
from tests.e2e.test_evaluate import _run, small_synthetic
from tests.e2e.test_fit import BASE, _fit_args


def _scalars(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def test_evaluation_during_fit_logs_on_schedule_and_changes_nothing(tmp_path: Path):
    eval_file = small_synthetic(tmp_path, rows=6)
    # base.yaml's Evaluation callback (the last one), on another schedule and conditions.
    settings = (
        f"--trainer.callbacks.sets=[{eval_file}]",
        "--trainer.callbacks.images=[original, blank, removing]",
        "--trainer.callbacks.every_n_steps=2",
        "--trainer.callbacks.batch_size=4",
        "--trainer.callbacks.num_rows=6",
    )
    with_eval = main(_fit_args(tmp_path / "with", *settings))
    # The same run with base.yaml's other callbacks only.
    base = yaml.safe_load(Path(BASE).read_text())
    others = [c for c in base["trainer"]["callbacks"] if not c["class_path"].endswith("Evaluation")]
    assert len(others) == len(base["trainer"]["callbacks"]) - 1
    without_config = tmp_path / "without.yaml"
    without_config.write_text(yaml.safe_dump({"trainer": {"callbacks": others}}))
    without = main(_fit_args(tmp_path / "without", "--config", str(without_config)))
    assert not any(isinstance(c, Evaluation) for c in without.trainer.callbacks)
    # Sampling for evaluation runs in a forked RNG: training is bit-for-bit the same.
    for (name, a), (_, b) in zip(
        with_eval.model.policy.named_parameters(),
        without.model.policy.named_parameters(),
        strict=True,
    ):
        assert torch.equal(a, b), name
    scalars = _scalars(with_eval.trainer.log_dir)
    for condition in ("original", "blank", "removing"):
        steps = [step for step, _ in scalars[f"eval/synthetic/{condition}/accuracy"]]
        assert steps == [0, 2]
    assert [s for s, _ in scalars["eval/synthetic/blank/gap"]] == [0, 2]
    assert "eval/synthetic/original/gap" not in scalars
    assert "val/accuracy" in scalars  # the validation loop's metric is still there

    # The last evaluation equals cppo evaluate's on the exported policy.
    evaluation = next(c for c in with_eval.trainer.callbacks if isinstance(c, Evaluation))
    payload = _run(
        str(Path(with_eval.trainer.log_dir) / "hf_policy"),
        eval_file,
        tmp_path / "eval",
        "--samples", "1", "--temperature", "0", "--batch-size", "4",
        "--images", "original", "blank", "removing",
        "--config", str(Path(with_eval.trainer.log_dir) / "config.yaml"),
    )  # fmt: skip
    figures = ("accuracy", "pass_at_k", "format_rate", "answer_kept", "by_category")
    for ours, theirs in zip(evaluation.last_results, payload["results"], strict=True):
        assert {k: ours[k] for k in figures} == {k: theirs[k] for k in figures}
