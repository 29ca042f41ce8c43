"""Every supported family trains a CPPO step offline, from a tiny model built from its config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cppo_lightning.cli import main
from cppo_lightning.policy import load_policy
from tests.e2e.test_fit import _fit_args
from tests.helpers.tiny_families import FAMILIES, build_tiny_family


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {family: build_tiny_family(family, root / family, seed=0) for family in FAMILIES}


def _one_step(tmp_path: Path, model_dir: Path, *extra: str):  # type: ignore[no-untyped-def]
    return main(
        _fit_args(
            tmp_path,
            f"--model.model_name_or_path={model_dir}",
            "--trainer.max_steps=1",
            "--trainer.val_check_interval=1",
            "--model.val_samples=1",
            "--rollout.max_new_tokens=8",
            "--trainer.callbacks=[]",  # no checkpoints/exports/monitor panels: the step only
            *extra,
        )
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_a_cppo_step_trains_the_language_model(family, family_dirs, tmp_path):
    model_dir = family_dirs[family]
    initial = dict(load_policy(str(model_dir)).named_parameters())
    cli = _one_step(tmp_path, model_dir)
    module = cli.model
    assert module.global_step == 1
    record = module.last_update
    assert record is not None and record.perception_mask is not None
    assert record.rollout.prompts.views is not None  # I+ and I- were drawn for this family
    changed = {
        name
        for name, p in module.policy.named_parameters()
        if not torch.equal(p.detach().cpu(), initial[name])
    }
    assert any("lm_head" in n or "embed_tokens" in n for n in changed), family
    assert any("vision" in n or "visual" in n for n in changed), f"{family}: vision not trained"
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"])


def test_lora_with_a_frozen_vision_tower_puts_no_adapter_in_it(family_dirs, tmp_path):
    # LLaVA's CLIP tower has q_proj/k_proj/v_proj too: even with model.lora.adapt_vision (which
    # would reach them), a frozen tower gets no adapter.
    cli = _one_step(
        tmp_path,
        family_dirs["llava"],
        "--model.lora={r: 4, alpha: 8, adapt_vision: true}",
        "--model.freeze_vision_tower=true",
    )
    module = cli.model
    trainable = [n for n, p in module.policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any("vision_tower" in n for n in trainable)
    assert any("language_model" in n for n in trainable)
    assert module.reference is None  # the reference is the base model with adapters off


def test_freezing_options_of_full_fine_tuning(family_dirs):
    model = load_policy(
        str(family_dirs["qwen2_5_vl"]),
        freeze_vision_tower=True,
        freeze_projector=True,
        activation_checkpointing=True,
    )
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters() if n.startswith("model.visual.")}
    assert model.is_activation_checkpointing


def test_an_unsupported_family_fails_at_load_time(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "paligemma"}')
    with pytest.raises(ValueError, match="'paligemma' model, which cppo-lightning does not"):
        load_policy(str(tmp_path))
