"""End-to-end: CPPO's ablation overlays (issue 31) for two optimizer steps through ``cppo fit``.

Each run stacks ``configs/experiments/<ablation>.yaml`` on base.yaml (shrunk to seconds by
``_fit_args``), and the last update's record is checked against the selection rule recomputed
from the entropies that update scored.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from cppo_lightning.callbacks import PerceptionTokens
from cppo_lightning.cli import main
from cppo_lightning.detection import TokenSelector
from tests.e2e.test_fit import _fit_args
from tests.e2e.test_perception_fit import _events

REPO = Path(__file__).resolve().parents[2]

#: What every CPPO run logs, and what a user of an ablation watches.
WATCHED = (
    "perception/cpl",
    "perception/d_pos",
    "perception/d_neg",
    "perception/contrast_accuracy",
    "perception/token_fraction",
    "perception/gated_fraction",
    "perception/selected_tokens",
    "perception/entropy_shift",
)


@pytest.mark.parametrize(
    "name", ["cppo-entropy-selection", "cppo-random-selection", "cppo-no-gating"]
)
def test_an_ablation_overlay_trains_and_selects_as_it_says(tmp_path, name):
    overlay = str(REPO / "configs" / "experiments" / f"{name}.yaml")
    cli = main(_fit_args(tmp_path, "--config", overlay))
    module = cli.model
    assert module.global_step == 2
    (callback,) = (cb for cb in cli.trainer.callbacks if isinstance(cb, PerceptionTokens))
    selector = callback.selector
    assert module.token_selector == selector

    events = _events(cli.trainer.log_dir)
    scalars = set(events.Tags()["scalars"])
    assert set(WATCHED) <= scalars, set(WATCHED) - scalars
    for tag in WATCHED:
        values = [e.value for e in events.Scalars(tag)]
        assert values and all(math.isfinite(v) for v in values), (tag, values)
    assert any(e.value > 0 for e in events.Scalars("perception/selected_tokens"))

    record = module.last_update
    assert record is not None and record.perception_mask is not None
    assert record.entropy is not None and record.entropy_removed is not None
    rollout, chosen = record.rollout, record.perception_mask
    mask, advantages = rollout.response_mask, rollout.advantages
    assert not (chosen & ~mask.bool()).any(), "padding selected"
    # The entropy-shift rule on the same entropies, the same budget options, no gate.
    shift_rule = TokenSelector(
        top_fraction=selector.top_fraction, score=selector.score, gate_advantages=False
    )
    shift = shift_rule(record.entropy, record.entropy_removed, mask)
    positive = (advantages > 0)[:, None]

    if name == "cppo-entropy-selection":
        assert selector.ranking == "entropy" and selector.gate_advantages
        by_entropy = TokenSelector(
            top_fraction=selector.top_fraction,
            score=selector.score,
            gate_advantages=False,
            ranking="entropy",
        )(record.entropy, record.entropy_removed, mask)
        assert chosen.any()
        assert torch.equal(chosen, by_entropy & positive)
        assert not torch.equal(chosen, shift & positive), "entropy selection = the shift rule's"
        # Direction: the chosen tokens are of higher entropy under I than the shift rule's.
        assert record.entropy[chosen].mean() > record.entropy[shift & positive].mean()
    elif name == "cppo-random-selection":
        assert selector.ranking == "random" and selector.gate_advantages
        assert chosen.any() and not chosen[~positive[:, 0]].any()
        assert torch.equal(chosen.sum(1), (shift & positive).sum(1))
    else:
        assert selector.ranking == "entropy-shift" and not selector.gate_advantages
        assert [e.value for e in events.Scalars("perception/gated_fraction")] == [1.0, 1.0]
        assert torch.equal(chosen, shift)
        negative = advantages <= 0
        assert negative.any() and chosen[negative].any(), "no token in A <= 0 responses"
        # Every response was scored under I and I- (the views ran on all of them).
        assert (record.entropy_removed[mask.bool()] != 0).all()
