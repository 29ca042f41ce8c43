"""resume.compare_settings and apply_configured_optimizer_settings on plain values."""

from __future__ import annotations

import pytest
import torch

from cppo_lightning.resume import (
    CheckpointError,
    apply_configured_optimizer_settings,
    compare_settings,
    configured_optimizer_settings,
)


def _optimizer(lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=lr, weight_decay=weight_decay)


def test_without_a_scheduler_the_configured_rate_and_decay_replace_the_restored_ones():
    configured = configured_optimizer_settings(_optimizer(2e-4, weight_decay=0.1))
    restored = _optimizer(1e-4)  # what Lightning's restore leaves
    changes = apply_configured_optimizer_settings(restored, configured, [])
    assert restored.param_groups[0]["lr"] == 2e-4
    assert restored.param_groups[0]["weight_decay"] == 0.1
    assert sorted(c.key for c in changes) == [
        "optimizer lr (group 0)",
        "optimizer weight_decay (group 0)",
    ]


def test_under_a_scheduler_a_new_rate_becomes_the_base_and_scales_the_current_one():
    configured = configured_optimizer_settings(_optimizer(2e-4))
    restored = _optimizer(1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(restored, lambda step: 0.5)
    assert restored.param_groups[0]["lr"] == pytest.approx(0.5e-4)
    apply_configured_optimizer_settings(restored, configured, [scheduler])
    assert restored.param_groups[0]["initial_lr"] == 2e-4
    assert scheduler.base_lrs == [2e-4]
    assert restored.param_groups[0]["lr"] == pytest.approx(1e-4)


def test_unchanged_settings_report_no_change():
    configured = configured_optimizer_settings(_optimizer(1e-4))
    assert apply_configured_optimizer_settings(_optimizer(1e-4), configured, []) == []


def test_lora_alpha_may_change_but_its_rank_may_not():
    stored = {"lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj"]}, "kl_coef": 0.01}
    allowed = compare_settings(
        stored, {"lora": {"r": 8, "alpha": 32, "target_modules": ["q_proj"]}, "kl_coef": 0.0}, "c"
    )
    assert sorted(c.key for c in allowed) == ["model.kl_coef", "model.lora.alpha"]
    with pytest.raises(CheckpointError, match=r"model\.lora\.r: the checkpoint's run had 8, "):
        compare_settings(stored, {"lora": {"r": 4, "alpha": 16, "target_modules": ["q_proj"]}}, "c")
    # Whether the vision side gets adapters decides which weights exist too.
    with pytest.raises(CheckpointError, match=r"model\.lora\.adapt_vision: the checkpoint's run"):
        compare_settings(
            {"lora": {"r": 8, "adapt_vision": False}}, {"lora": {"r": 8, "adapt_vision": True}}, "c"
        )
