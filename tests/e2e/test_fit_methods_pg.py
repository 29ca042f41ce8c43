"""End-to-end: ``cppo fit`` with each overlay of GSPO, high-entropy tokens and VPPO for 2
optimizer steps on the embedded model: the method's metrics are logged and finite, and every
trainable parameter moved.

One rollout batch of 2 prompts makes both steps (``mini_batch_size=1``), so the second step's
importance ratios are not 1: GSPO's clipping and ratio statistics act on a moved policy.
"""

from __future__ import annotations

import math

import pytest
import torch

from cppo_lightning.cli import main
from cppo_lightning.policy import load_policy
from tests.helpers.runs import REPO, fit_args

# Overlay -> the metrics a user of the method watches (each must be logged and finite).
METRICS = {
    "gspo": [
        "train/clip_frac",
        "train/seq_clip_frac",
        "train/ratio_mean",
        "train/ratio_min",
        "train/ratio_max",
        "train/approx_kl",
    ],
    "high-entropy": [
        "train/tokens/fraction",
        "train/tokens/threshold",
        "train/tokens/selected_mean",
        "train/tokens/rejected_mean",
        "train/tokens/entropy_mean",
    ],
    "vppo": [
        "train/tokens/fraction",
        "train/tokens/threshold",
        "train/tokens/selected_mean",
        "train/tokens/rejected_mean",
        "train/tokens/dependency_mean",
        "train/advantage/score_mean",
        "train/advantage/score_low",
        "train/advantage/score_high",
        "train/advantage/scale_max",
        "train/advantage/scale_mean",
        "train/entropy/estimate",
        "train/entropy/loss",
    ],
}


def _fit(root, name: str):  # type: ignore[no-untyped-def]
    args = fit_args(root, "--model.mini_batch_size=1", steps=2)
    # The overlay right after base.yaml, as the docs run it: the flags after it (the run's
    # root folder among them) still win.
    overlay = str(REPO / "configs" / "experiments" / f"{name}.yaml")
    return main([*args[:3], "--config", overlay, *args[3:]])


@pytest.mark.parametrize("name", sorted(METRICS))
def test_an_overlay_trains_and_logs_its_metrics(tmp_path, name):
    initial = dict(load_policy("builtin:tiny-qwen2.5-vl").named_parameters())
    cli = _fit(tmp_path, name)
    module = cli.model
    assert module.global_step == 2
    assert cli.trainer.fit_loop.epoch_loop.batch_progress.total.completed == 1
    assert str(cli.trainer.default_root_dir) == str(tmp_path)

    logged = cli.trainer.callback_metrics
    for key in METRICS[name]:
        assert key in logged, f"{key} not logged; logged: {sorted(logged)}"
        assert math.isfinite(float(logged[key])), (key, float(logged[key]))
    unchanged = [
        n
        for n, p in module.policy.named_parameters()
        if p.requires_grad and torch.equal(p.detach().cpu(), initial[n].detach())
    ]
    assert not unchanged, f"parameters not updated: {unchanged[:5]}"

    if name == "gspo":
        # The second mini-batch sees a moved policy: its ratios spread around 1.
        assert float(logged["train/ratio_max"]) > float(logged["train/ratio_min"])
        assert module.kl_coef == 0.0 and module.reference is None
    elif name == "high-entropy":
        assert 0.2 <= float(logged["train/tokens/fraction"]) < 0.3
    else:  # vppo: the masked image is drawn and read
        assert cli.datamodule.view_names == ("removing",)
        assert float(logged["train/tokens/fraction"]) >= 0.4
        assert float(logged["train/advantage/scale_max"]) >= 1.0
