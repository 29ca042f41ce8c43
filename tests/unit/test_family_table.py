"""The family table: picking the images of some prompts in each layout, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cppo_lightning.families import FAMILIES, family_for, select_vision, supported_model_types
from cppo_lightning.policy import LoraSettings, apply_lora, load_policy, model_family
from tests.helpers.tiny_families import FAMILIES as TINY_FAMILIES
from tests.helpers.tiny_families import build_tiny_family


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


# --- where LoRA puts its adapters, per family ------------------------------------------------

LANGUAGE_MODEL = {
    "qwen2_vl": "model.language_model",
    "qwen2_5_vl": "model.language_model",
    "qwen3_vl": "model.language_model",
    "idefics3": "model.text_model",
    "llava": "model.language_model",
}
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]  # LoraSettings' default targets
ATTENTION_AND_MLP = [*ATTENTION, "gate_proj", "up_proj", "down_proj"]  # configs/paper/*-lora.yaml
# The vision-tower modules that carry those names, read off the tiny models (Qwen2-VL's and
# Qwen3-VL's vision blocks have qkv/proj and fc1/fc2 or linear_fc1/linear_fc2 instead).
VISION_NAMESAKES = {
    "qwen2_vl": set(),
    "qwen2_5_vl": {"gate_proj", "up_proj", "down_proj"},
    "qwen3_vl": set(),
    "idefics3": {"q_proj", "k_proj", "v_proj"},  # SigLIP (its output projection is out_proj)
    "llava": {"q_proj", "k_proj", "v_proj"},  # CLIP
}


@pytest.fixture(scope="module")
def tiny_family_dirs(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    assert set(TINY_FAMILIES) == set(LANGUAGE_MODEL)
    root = tmp_path_factory.mktemp("families")
    return {name: build_tiny_family(name, root / name, seed=0) for name in TINY_FAMILIES}


def _linear_names(model: torch.nn.Module, prefixes: tuple[str, ...], names: list[str]) -> set:
    """Linear layers under ``prefixes`` whose own name is one of ``names``."""
    return {
        path
        for path, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and path.startswith(tuple(f"{p}." for p in prefixes))
        and path.rsplit(".", 1)[-1] in names
    }


def _adapted(model_dir, settings, exclude=()):  # type: ignore[no-untyped-def]
    wrapped = apply_lora(load_policy(str(model_dir)), settings, exclude)
    return {
        path.removeprefix("base_model.model.").removesuffix(".lora_A")
        for path, _ in wrapped.named_modules()
        if path.endswith(".lora_A")
    }


@pytest.mark.parametrize("targets", [ATTENTION, ATTENTION_AND_MLP], ids=["attention", "attn+mlp"])
@pytest.mark.parametrize("name", sorted(LANGUAGE_MODEL))
def test_lora_adapts_the_language_model_only_by_default(name, targets, tiny_family_dirs):
    # With the vision tower left trainable (model.freeze_vision_tower false, the default), the
    # adapters are exactly the language model's modules with those names, in every family: none
    # in Idefics3's SigLIP or LLaVA's CLIP (which name their attention q/k/v_proj), none in
    # Qwen2.5-VL's vision MLP (gate/up/down_proj), none in any projector.
    base = load_policy(str(tiny_family_dirs[name]))
    expected = _linear_names(base, (LANGUAGE_MODEL[name],), targets)
    assert expected
    assert _adapted(tiny_family_dirs[name], LoraSettings(target_modules=targets)) == expected


@pytest.mark.parametrize("name", sorted(LANGUAGE_MODEL))
def test_lora_adapt_vision_also_reaches_the_towers_that_use_those_names(name, tiny_family_dirs):
    base = load_policy(str(tiny_family_dirs[name]))
    family = model_family(str(tiny_family_dirs[name]))
    language = _linear_names(base, (LANGUAGE_MODEL[name],), ATTENTION_AND_MLP)
    vision = _linear_names(base, family.vision_tower, ATTENTION_AND_MLP)
    assert {path.rsplit(".", 1)[-1] for path in vision} == VISION_NAMESAKES[name]
    settings = LoraSettings(target_modules=ATTENTION_AND_MLP, adapt_vision=True)
    assert _adapted(tiny_family_dirs[name], settings) == language | vision
    # model.freeze_vision_tower (the module passes the tower as ``exclude``) still wins.
    frozen = _adapted(tiny_family_dirs[name], settings, exclude=family.vision_tower)
    assert frozen == language


def test_the_paper_lora_configs_adapt_the_same_qwen2_5_vl_modules(tiny_family_dirs):
    # configs/paper/*-lora.yaml freeze the vision tower and target attention + MLP: adapters on
    # the language model's 7 projections per layer, the same modules as before the vision side
    # was left out by default (the tower was excluded as frozen, the merger has no such names).
    import yaml

    repo = Path(__file__).resolve().parents[2]
    for size in ("3b", "7b"):
        config = yaml.safe_load(
            (repo / f"configs/paper/qwen2.5-vl-{size}-1gpu-lora.yaml").read_text()
        )
        assert config["model"]["freeze_vision_tower"] is True
        settings = LoraSettings(**config["model"]["lora"])
        model_dir = tiny_family_dirs["qwen2_5_vl"]
        family = model_family(str(model_dir))
        adapted = _adapted(model_dir, settings, exclude=family.vision_tower)
        expected = _linear_names(
            load_policy(str(model_dir)), ("model.language_model",), settings.target_modules
        )
        assert adapted == expected and len(adapted) == 7 * 2  # 2 layers in the tiny model
