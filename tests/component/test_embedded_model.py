"""The embedded model's build stages, and that the shipped asset looks at its image."""

from __future__ import annotations

import json
from importlib import resources

import numpy as np
import pytest
import torch
from PIL import Image

from cppo_lightning.data.synthetic import SyntheticShapes, generate_samples, region_targets
from cppo_lightning.tiny import (
    build_random_tiny,
    heldout_accuracy,
    looking_problems,
    pretrain_vision,
    supervised_warm_start,
)


def _small_model():  # type: ignore[no-untyped-def]
    return build_random_tiny(seed=1, hidden_size=64, num_layers=2)


def test_vision_pretraining_trains_the_tower_only_and_learns():
    model, processor = _small_model()
    samples = generate_samples(64, seed=5)
    images = [s["image"] for s in samples]
    targets = np.stack([region_targets(s["shapes"], s["image"]) for s in samples])
    language = {k: v.clone() for k, v in model.model.language_model.state_dict().items()}
    vision = {k: v.clone() for k, v in model.model.visual.state_dict().items()}
    head, losses = pretrain_vision(model, processor, images, targets, steps=30, batch_size=16)
    assert len(losses) == 30 and head.out_features == targets.shape[-1]
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    for key, value in model.model.language_model.state_dict().items():
        assert torch.equal(value, language[key]), key
    assert any(
        not torch.equal(value, vision[key])
        for key, value in model.model.visual.state_dict().items()
    )
    with pytest.raises(ValueError, match="batch_size <= len"):
        pretrain_vision(model, processor, images, targets, steps=1, batch_size=65)


def test_warm_start_takes_the_region_loss_and_checks_its_targets():
    model, processor = _small_model()
    data = SyntheticShapes(num_train=16, num_val=4, seed=0)
    rows = data.load()["train"]
    scenes = generate_samples(16, data.train_seed)
    assert [s["question"] for s in scenes] == rows["question"]  # the scenes behind the rows
    targets = np.stack([region_targets(s["shapes"], s["image"]) for s in scenes])
    head, _ = pretrain_vision(
        model, processor, [s["image"] for s in scenes], targets, steps=1, batch_size=8
    )
    before = head.weight.detach().clone()
    losses = supervised_warm_start(
        model, processor, rows, steps=2, batch_size=4, region_head=head, targets=targets
    )
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert not torch.equal(head.weight, before)  # the auxiliary term trains the head too
    with pytest.raises(ValueError, match="targets for every row"):
        supervised_warm_start(
            model, processor, rows, steps=1, batch_size=4, region_head=head, targets=targets[:3]
        )


def test_looking_problems_name_each_failed_check():
    looks = {
        "original": {"accuracy": 0.6},
        "blank": {"accuracy": 0.3},
        "shuffled": {"accuracy": 0.2},
    }
    assert looking_problems(looks, 0.25, (0.3, 0.7)) == []
    problems = looking_problems(looks, 0.35, (0.3, 0.5))
    assert len(problems) == 2
    assert "blank images is 0.300" in problems[0] and "outside [0.3, 0.5]" in problems[1]


def test_the_shipped_model_looks_and_its_build_info_is_true():
    asset = resources.files("cppo_lightning") / "assets" / "tiny-qwen2.5-vl"
    info = json.loads((asset / "build_info.json").read_text())
    greedy = info["heldout"]["greedy"]
    assert looking_problems(greedy, 0.25, (0.3, 0.7)) == []
    from cppo_lightning.policy import load_policy, load_processor

    model = load_policy("builtin:tiny-qwen2.5-vl", dtype="float32")
    processor = load_processor("builtin:tiny-qwen2.5-vl")
    rows = SyntheticShapes().load()["validation"]
    # The recorded figure is what the model does (here through the build's own greedy decoder).
    accuracy = heldout_accuracy(model, processor, rows, max_new_tokens=48)
    assert accuracy == pytest.approx(greedy["original"]["accuracy"], abs=1e-4)
    black = rows.select(range(64)).map(lambda r: {"image": Image.new("RGB", r["image"].size)})
    dark = heldout_accuracy(model, processor, black, max_new_tokens=48)
    seen = heldout_accuracy(model, processor, rows.select(range(64)), max_new_tokens=48)
    assert seen - dark >= 0.2, (seen, dark)
