"""End-to-end: ``cppo fit`` through LightningCLI on the embedded model for a few steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText

from cppo_lightning.cli import main
from cppo_lightning.policy import load_policy, resolve_model_path

REPO = Path(__file__).resolve().parents[2]
BASE = str(REPO / "configs" / "base.yaml")


def _fit_args(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        BASE,
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.max_steps=2",
        "--trainer.val_check_interval=2",
        "--trainer.enable_progress_bar=false",
        "--data.batch_size=2",
        "--model.mini_batch_size=null",  # one optimizer step per rollout batch of 2
        "--data.dataset.init_args.num_train=16",
        "--data.dataset.init_args.num_val=4",
        "--rollout.max_new_tokens=16",
        # A reward with variance in every group, so every step has a gradient to follow.
        "--model.reward.init_args.functions={length: tests.helpers.rewards.length_reward}",
        "--model.reward.init_args.weights={length: 1.0}",
        "--model.val_accuracy_term=length",  # the reward has no accuracy term
        # base.yaml's Evaluation callback (its last) on 4 held-out prompts, not 256.
        "--trainer.callbacks.num_rows=4",
        *extra,
    ]


def test_fit_updates_every_trainable_parameter_and_no_reference_parameter(tmp_path):
    initial = load_policy("builtin:tiny-qwen2.5-vl")
    cli = main(_fit_args(tmp_path))
    module = cli.model
    assert module.global_step == 2
    trained = dict(module.policy.named_parameters())
    unchanged = [
        name
        for name, before in initial.named_parameters()
        if torch.equal(before, trained[name].detach().cpu())
    ]
    assert not unchanged, f"parameters not updated: {unchanged[:5]}"
    for name, ref in module.reference.named_parameters():
        assert not ref.requires_grad
        torch.testing.assert_close(ref.detach().cpu(), dict(initial.named_parameters())[name])


def test_fit_logs_val_accuracy_before_and_after_and_exports(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cli = main(_fit_args(tmp_path))
    log_dir = Path(cli.trainer.log_dir)
    events = EventAccumulator(str(log_dir))
    events.Reload()
    steps = [e.step for e in events.Scalars("val/accuracy")]
    assert steps[0] == 0 and steps[-1] == 2, steps
    for tag in (
        "rollout/reward_mean",
        "rollout/logp_mismatch",
        "train/kl",
        "train/clip_frac",
        "train/grad_norm",
        "train/lr",
    ):
        assert tag in events.Tags()["scalars"], tag
    # The checkpoint holds the trainable policy weights only, not the frozen reference.
    checkpoint = torch.load(log_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["state_dict"]
    assert all(k.startswith("policy.") for k in checkpoint["state_dict"])
    # The exported policy loads with plain transformers and gives the trained logits.
    exported = AutoModelForImageTextToText.from_pretrained(log_dir / "hf_policy")
    for name, value in exported.named_parameters():
        torch.testing.assert_close(value, dict(cli.model.policy.named_parameters())[name].cpu())


@pytest.mark.slow
def test_resume_from_checkpoint_continues_the_step_count(tmp_path):
    first = main(_fit_args(tmp_path))
    ckpt = Path(first.trainer.log_dir) / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    second = main(_fit_args(tmp_path, "--trainer.max_steps=4", f"--ckpt_path={ckpt}"))
    assert second.model.global_step == 4
    assert resolve_model_path("builtin:tiny-qwen2.5-vl")  # the base weights stay untouched


def test_batch_sizes_that_cannot_split_fail_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"data\.batch_size=2 is not a multiple of model\.mini"):
        main(_fit_args(tmp_path, "--model.mini_batch_size=3"))


def test_several_mini_batches_per_rollout_batch(tmp_path):
    cli = main(_fit_args(tmp_path, "--model.mini_batch_size=1"))
    # 2 rollout batches x 2 mini-batches would be 4 optimizer steps; max_steps=2 stops after one.
    assert cli.model.global_step == 2
    assert cli.trainer.fit_loop.epoch_loop.batch_progress.total.completed == 1


def _rollout_callbacks(cli):  # type: ignore[no-untyped-def]
    from cppo_lightning.callbacks import RolloutCallback

    return [cb for cb in cli.trainer.callbacks if isinstance(cb, RolloutCallback)]


def test_a_rollout_engine_is_chosen_by_class_path_and_samples_everything(tmp_path):
    """The configured engine samples training rollouts (G = 8), validation (val_samples = 3) and
    the Evaluation callback (samples = 2) alike: each is told apart by its number of samples."""
    cli = main(
        _fit_args(
            tmp_path,
            "--rollout.engine=tests.helpers.engines.RecordingEngine",
            "--model.val_samples=3",
            "--trainer.callbacks.samples=2",  # base.yaml's Evaluation callback (its last)
            "--trainer.callbacks.temperature=1.0",
        )
    )
    (callback,) = _rollout_callbacks(cli)
    engine = callback.engine
    assert type(engine).__name__ == "RecordingEngine"
    # 2 rollout batches; validation of the 4 held-out prompts (one batch) before the first
    # update and after the last; the Evaluation callback's 4 prompts under its 3 image
    # conditions (one unit each) before the first update.
    assert engine.num_samples.count(8) == 2
    assert engine.num_samples.count(3) == 2
    assert engine.num_samples.count(2) == 3
    assert engine.samples == 7
    assert engine.updates == 2  # one sync per step
    assert cli.model.rollout_engine is engine


def test_a_users_rollout_callback_replaces_the_default(tmp_path):
    user = (
        '{"class_path": "tests.helpers.engines.CountingRollout", '
        '"init_args": {"group_size": 8, "max_new_tokens": 16}}'
    )
    cli = main(_fit_args(tmp_path, f"--trainer.callbacks+={user}"))
    callbacks = _rollout_callbacks(cli)
    (custom,) = [cb for cb in callbacks if type(cb).__name__ == "CountingRollout"]
    (stock,) = [cb for cb in callbacks if cb is not custom]
    assert custom.calls == 2 and stock.replaced_by is custom
    assert cli.model.rollout_engine is custom.engine  # validation and evaluation use it too
    assert cli.model.global_step == 2


def test_two_stock_rollout_callbacks_are_refused(tmp_path):
    extra = (
        '{"class_path": "cppo_lightning.callbacks.RolloutCallback", "init_args": {"group_size": 8}}'
    )
    with pytest.raises(ValueError, match="rollout callbacks"):
        main(_fit_args(tmp_path, f"--trainer.callbacks+={extra}"))
