"""Image conditions change only the pixels (same sizes, same prompt tokens); shuffled never shows
a row its own image; the views are the ones training draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cppo_lightning.data.datamodule import PromptCollator
from cppo_lightning.data.views import ViewMaker
from cppo_lightning.evaluation.conditions import (
    CONDITIONS,
    ImageConditions,
    check_conditions,
    shuffle_partners,
)
from cppo_lightning.families import family_of_processor
from cppo_lightning.perturbations import information_preserving, information_removing
from cppo_lightning.policy import load_processor


@pytest.fixture(scope="module")
def processor():
    return load_processor("builtin:tiny-qwen2.5-vl")


def _conditions() -> ImageConditions:
    return ImageConditions(information_preserving(), information_removing(), view_seed=3)


@pytest.mark.parametrize("condition", CONDITIONS)
def test_every_condition_keeps_the_prompt_tokens_and_changes_only_pixels(
    condition, processor, shapes_rows
):
    rows = shapes_rows[:2]
    images = [row["image"].convert("RGB") for row in rows]
    partner = [Image.new("RGB", (112, 112), (9, 200, 9))]
    changed = [
        {**row, "image": _conditions().apply(condition, [image], i, lambda: partner)}
        for i, (row, image) in enumerate(zip(rows, images, strict=True))
    ]
    collate = PromptCollator(processor, "Answer.")
    before, after = collate(rows), collate(changed)
    assert torch.equal(before.input_ids, after.input_ids)
    assert torch.equal(before.vision["image_grid_thw"], after.vision["image_grid_thw"])
    assert [r["image"][0].size for r in changed] == [image.size for image in images]
    same = torch.equal(before.vision["pixel_values"], after.vision["pixel_values"])
    assert same == (condition == "original")


def test_blank_and_mean_images():
    image = Image.new("RGB", (4, 2), (10, 20, 30))
    image.putpixel((0, 0), (90, 20, 30))  # mean red: (90 + 7 * 10) / 8 = 20
    conditions = ImageConditions()
    assert conditions.apply("blank", [image], 0)[0].getcolors() == [(8, (0, 0, 0))]
    assert conditions.apply("mean", [image], 0)[0].getcolors() == [(8, (20, 20, 30))]


def test_shuffle_pairs_rows_of_the_same_size_and_never_a_row_with_itself():
    sizes = [(1,), (1,), (2,), (1,), (2,), (3,)]
    partners, resized = shuffle_partners(sizes, seed=0)
    assert all(p != row for row, p in enumerate(partners))
    for row in (0, 1, 2, 3, 4):  # groups of size (1,) and (2,)
        assert sizes[partners[row]] == sizes[row] and not resized[row]
    assert resized[5]  # alone in its size: another row's image, resized
    # a permutation within each group: every image is shown exactly once
    assert sorted(partners[:2] + partners[3:4]) == [0, 1, 3]
    assert shuffle_partners(sizes, seed=0) == (partners, resized)  # seeded
    assert shuffle_partners([(1,)], seed=0) == ([0], [True])


def test_shuffled_resizes_a_partner_of_another_size():
    image = Image.new("RGB", (8, 6))
    other = Image.new("RGB", (5, 5), (1, 2, 3))
    shown = ImageConditions().apply("shuffled", [image], 0, lambda: [other])
    assert shown[0].size == (8, 6) and shown[0].getpixel((0, 0)) == (1, 2, 3)


def test_views_are_those_training_draws_at_epoch_0(processor, shapes_rows):
    rows = [{**row, "__row_index__": i} for i, row in enumerate(shapes_rows[:2])]
    batch = PromptCollator(processor, "Answer.", keep_images=True)(rows)
    maker = ViewMaker(
        processor.image_processor,
        information_preserving(),
        information_removing(),
        seed=3,
        family=family_of_processor(processor),
    )
    views = maker(batch, epoch=0)
    conditions = _conditions()
    for row in range(2):
        image = shapes_rows[row]["image"].convert("RGB")
        for name in ("preserving", "removing"):
            drawn = getattr(views.views, name)[row]
            ours = torch.from_numpy(np.array(conditions.apply(name, [image], row)[0]))
            theirs = drawn.clamp(0, 1).mul(255).round().to(torch.uint8)
            assert torch.equal(ours.permute(2, 0, 1), theirs), name


def test_unknown_or_unconfigured_conditions_say_what_to_change():
    with pytest.raises(ValueError, match=r"unknown image condition.*--images takes"):
        check_conditions(["original", "noise"])
    with pytest.raises(ValueError, match="at least one"):
        check_conditions([])
    assert check_conditions(["blank", "original", "blank"]) == ["blank", "original"]
    with pytest.raises(ValueError, match="needs the removing view"):
        ImageConditions(information_preserving(), None).check(["removing"])
