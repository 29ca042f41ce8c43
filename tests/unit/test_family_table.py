"""The family table: picking the images of some prompts in each layout, and clear errors."""

from __future__ import annotations

import pytest
import torch

from cppo_lightning.families import FAMILIES, family_for, select_vision, supported_model_types


def test_patch_layout_repeats_and_reorders_prompts_with_several_images():
    # Prompt 0: one image of 2 patches; prompt 1: two images of 3 and 1 patches.
    grid = torch.tensor([[1, 1, 2], [1, 1, 3], [1, 1, 1]])
    pixels = torch.tensor([[0.0], [0.0], [1.0], [1.0], [1.0], [2.0]])
    vision = {"pixel_values": pixels, "image_grid_thw": grid}
    layout = {"pixel_values": "patch", "image_grid_thw": "image"}
    picked = select_vision(vision, layout, torch.tensor([1, 2]), torch.tensor([1, 0, 0]))
    assert picked["pixel_values"].squeeze(1).tolist() == [1, 1, 1, 2, 0, 0, 0, 0]
    assert picked["image_grid_thw"].tolist() == [[1, 1, 3], [1, 1, 1], [1, 1, 2], [1, 1, 2]]


def test_image_and_prompt_layouts():
    per_image = torch.arange(3.0).view(3, 1, 1, 1)  # LLaVA-like: one row per image
    per_prompt = torch.arange(2.0).view(2, 1)  # Idefics3-like: one row per prompt
    vision = {"pixel_values": per_image, "pixel_attention_mask": per_prompt}
    layout = {"pixel_values": "image", "pixel_attention_mask": "prompt"}
    picked = select_vision(vision, layout, torch.tensor([2, 1]), torch.tensor([1, 1, 0]))
    assert picked["pixel_values"].flatten().tolist() == [2, 2, 0, 1]
    assert picked["pixel_attention_mask"].flatten().tolist() == [1, 1, 0]


def test_unsupported_model_type_names_the_supported_ones():
    with pytest.raises(ValueError, match=r"'gemma3' model, which cppo-lightning does not support"):
        family_for("gemma3", source="'google/gemma-3-4b-it'")
    assert {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "idefics3", "llava"} <= set(
        supported_model_types()
    )


def test_every_family_declares_its_image_tensors():
    for family in FAMILIES:
        assert "pixel_values" in family.image_keys
        assert set(family.image_keys.values()) <= {"prompt", "image", "patch"}
        if "patch" in family.image_keys.values():
            assert "image_grid_thw" in family.image_keys, family.name
