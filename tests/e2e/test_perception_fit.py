"""End-to-end: CPPO (the base config), and the GRPO / PAPO overlays, for a few steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cppo_lightning.callbacks import CPLWeight, PerceptionTokens
from cppo_lightning.cli import main
from cppo_lightning.perception import ContrastivePerception, ImplicitPerception
from cppo_lightning.policy import load_policy
from tests.e2e.test_fit import _fit_args

REPO = Path(__file__).resolve().parents[2]


def _events(log_dir: str):  # type: ignore[no-untyped-def]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(log_dir, size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    return events


def test_cppo_fit_trains_every_parameter_and_logs_perception(tmp_path):
    initial = load_policy("builtin:tiny-qwen2.5-vl")
    cli = main(_fit_args(tmp_path))  # the base config logs panels at the first step
    module = cli.model
    assert isinstance(module.perception_loss, ContrastivePerception)
    assert module.global_step == 2
    trained = dict(module.policy.named_parameters())
    unchanged = [n for n, p in initial.named_parameters() if torch.equal(p, trained[n].cpu())]
    assert not unchanged, f"parameters not updated: {unchanged[:5]}"
    for name, ref in module.reference.named_parameters():
        torch.testing.assert_close(ref.detach().cpu(), dict(initial.named_parameters())[name])
    record = module.last_update
    assert record is not None and record.perception_mask is not None
    mask, rollout = record.perception_mask, record.rollout
    assert mask.shape == rollout.response_mask.shape
    assert not (mask & ~rollout.response_mask.bool()).any(), "padding selected"
    assert not mask[rollout.advantages <= 0].any(), "a response with A <= 0 carries tokens"
    events = _events(cli.trainer.log_dir)
    scalars = set(events.Tags()["scalars"])
    for tag in (
        "perception/cpl",
        "perception/lambda",
        "perception/token_fraction",
        "perception/gated_fraction",
        "perception/entropy_shift",
        "perception/d_pos",
        "perception/d_neg",
    ):
        assert tag in scalars, tag
    assert [e.value for e in events.Scalars("perception/lambda")][-1] == pytest.approx(0.01)
    assert "perception/views/0" in events.Tags()["images"]
    assert any("perception/responses" in tag for tag in events.Tags()["tensors"])


@pytest.mark.parametrize("experiment", ["grpo", "papo"])
def test_overlays_turn_the_run_into_the_baselines(tmp_path, experiment):
    overlay = str(REPO / "configs" / "experiments" / f"{experiment}.yaml")
    cli = main(_fit_args(tmp_path, "--config", overlay))
    assert cli.model.global_step == 2
    callbacks = cli.trainer.callbacks
    assert not any(isinstance(cb, (PerceptionTokens, CPLWeight)) for cb in callbacks)
    scalars = set(_events(cli.trainer.log_dir).Tags()["scalars"])
    views = cli.model.last_update.rollout.prompts.views
    if experiment == "grpo":
        assert cli.model.perception_loss is None and views is None
        assert not any(tag.startswith("perception/") for tag in scalars)
    else:
        assert isinstance(cli.model.perception_loss, ImplicitPerception)
        assert views.removing is not None and views.preserving is None
        assert {"perception/kl_prcp", "perception/entropy", "perception/masked_entropy"} <= scalars


def test_rollout_time_detection(tmp_path):
    cli = main(_fit_args(tmp_path, "--perception_tokens.init_args.policy=rollout"))
    record = cli.model.last_update
    assert record.rollout.perception_mask is not None  # detected before the update
    # The loss used the rollout-time tokens of the positive-advantage responses.
    gate = (record.rollout.advantages > 0)[:, None]
    assert torch.equal(record.perception_mask, record.rollout.perception_mask & gate)


def test_cppo_without_its_callbacks_says_what_to_add(tmp_path):
    with pytest.raises(ValueError, match="`perception_tokens:` and `cpl_weight:`"):
        main(_fit_args(tmp_path, "--cpl_weight=null"))


def test_cppo_without_views_says_what_to_set(tmp_path):
    with pytest.raises(ValueError, match=r"data\.removing_view"):
        main(_fit_args(tmp_path, "--data.removing_view=null"))


def test_cpl_callbacks_under_grpo_say_to_remove_them(tmp_path):
    with pytest.raises(ValueError, match="perception_tokens: null"):
        main(_fit_args(tmp_path, "--model.perception_loss=null"))


@pytest.mark.slow
def test_cpl_weight_schedule_survives_resume(tmp_path):
    warmup = ["--cpl_weight.init_args.warmup_steps=4"]
    first = main(_fit_args(tmp_path, *warmup))
    ckpt = Path(first.trainer.log_dir) / "checkpoints" / "last.ckpt"
    second = main(_fit_args(tmp_path, *warmup, "--trainer.max_steps=4", f"--ckpt_path={ckpt}"))
    weight = next(cb for cb in second.trainer.callbacks if isinstance(cb, CPLWeight))
    assert weight.step == 4  # 2 before the checkpoint + 2 after: the warm-up was not restarted
    lam = [e.value for e in _events(second.trainer.log_dir).Scalars("perception/lambda")]
    assert lam[-1] == pytest.approx(0.01 * 3 / 4)
