"""A run counts optimizer steps everywhere: ``trainer.max_steps``, the logged x-axis, the progress
bar and the checkpoint interval, with several optimizer steps per rollout batch."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from cppo_lightning.callbacks import RunProgressBar
from cppo_lightning.cli import main
from tests.e2e.test_fit import _fit_args

# Two optimizer steps per rollout batch: data.batch_size 2, mini-batches of 1 prompt.
TWO_STEPS = ("--model.mini_batch_size=1",)


def test_max_steps_off_the_rollout_batches_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    """max_steps=3 with 2 optimizer steps per rollout batch would stop at 4 (and a cosine sized
    to 3 would climb again): refused, naming both numbers and the nearest valid values, before
    any model is loaded."""
    import cppo_lightning.module

    def no_loading(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr(cppo_lightning.module, "load_policy", no_loading)
    message = (
        r"trainer\.max_steps=3 is not a multiple of the 2 optimizer steps each rollout batch "
        r"makes \(data\.batch_size=2 / model\.mini_batch_size=1\): set trainer\.max_steps to 2 "
        r"or 4"
    )
    with pytest.raises(ValueError, match=message):
        main(_fit_args(tmp_path, *TWO_STEPS, "--trainer.max_steps=3"))


def test_metrics_checkpoints_and_the_bar_count_optimizer_steps(tmp_path):
    """3 rollout batches of 2 optimizer steps: training metrics are logged at steps 2, 4, 6 and
    val/* at 0 and 6, on one axis; a checkpoint every 3 optimizer steps is written after the
    batches that reach 3 and 6 (Lightning's ModelCheckpoint would write at 6 only) without
    Lightning's manual-optimisation warning; the bar ends at 6/6 in rollout batch 3/3."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    checkpoint = [
        "--trainer.callbacks+=cppo_lightning.callbacks.StepCheckpoint",
        "--trainer.callbacks.every_n_train_steps=3",
        "--trainer.callbacks.save_top_k=-1",
        "--trainer.callbacks.filename={step}",
    ]
    args = _fit_args(
        tmp_path,
        *TWO_STEPS,
        "--trainer.max_steps=6",
        "--trainer.val_check_interval=3",  # rollout batches
        "--trainer.enable_progress_bar=true",
        *checkpoint,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = main(args)
    assert not [w for w in caught if "manual optimization" in str(w.message)]
    log_dir = Path(cli.trainer.log_dir)
    events = EventAccumulator(str(log_dir))
    events.Reload()
    for tag in ("train/loss", "rollout/reward_mean", "perception/cpl"):
        assert [e.step for e in events.Scalars(tag)] == [2, 4, 6], tag
    assert [e.step for e in events.Scalars("val/accuracy")] == [0, 6]
    assert [e.step for e in events.Scalars("eval/synthetic/original/accuracy")] == [0]
    saved = sorted(p.name for p in (log_dir / "checkpoints").glob("step=*.ckpt"))
    assert saved == ["step=4.ckpt", "step=6.ckpt"]
    (bar,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, RunProgressBar)]
    assert (bar.train_progress_bar.n, bar.train_progress_bar.total) == (6, 6)
    assert bar.train_progress_bar.desc.startswith("Rollout batch 3/3, optimizer step")


def test_a_configured_progress_bar_is_kept(tmp_path):
    """The step-counting bar is only the default: a progress bar in trainer.callbacks stays."""
    args = _fit_args(
        tmp_path,
        "--trainer.enable_progress_bar=true",
        "--trainer.callbacks+=lightning.pytorch.callbacks.TQDMProgressBar",
    )
    cli = main(args[1:], run=False)  # built, not run
    bars = [cb for cb in cli.trainer.callbacks if type(cb).__name__.endswith("ProgressBar")]
    assert [type(cb).__name__ for cb in bars] == ["TQDMProgressBar"]
