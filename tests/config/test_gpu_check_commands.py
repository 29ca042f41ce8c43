"""What benchmarks/gpu_check.py runs on a GPU, checked without one: its ``cppo fit`` command
lines parse into the settings each part is meant to measure, and the model it builds gets
Qwen2.5-VL's pixel budget."""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

import pytest
import yaml
from benchmarks.gpu_check import FIT_PARTS, GPU, fit_command
from benchmarks.gpu_check_probes import use_qwen_pixels
from PIL import Image

from cppo_lightning.cli import main
from cppo_lightning.policy import load_processor


def _parsed(part: str, tmp_path: Path) -> dict:
    command = fit_command(part, GPU, "/nodes/model", tmp_path / "run", tmp_path / "phases.jsonl")
    assert command[1:4] == ["-m", "cppo_lightning.cli", "fit"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as stop:
        main([*command[3:], "--print_config"])
    assert stop.value.code in (0, None)
    return yaml.safe_load(out.getvalue())


@pytest.mark.parametrize("part", FIT_PARTS)
def test_the_gpu_commands_parse_into_what_each_part_measures(part, tmp_path):  # type: ignore[no-untyped-def]
    config = _parsed(part, tmp_path)
    trainer, model, rollout = config["trainer"], config["model"], config["rollout"]
    assert trainer["accelerator"] == "gpu" and str(trainer["devices"]) == "1"
    assert trainer["precision"] == "bf16-mixed"
    assert trainer["max_steps"] == 2 * GPU.rollout_batches[part]  # 2 mini-batches per batch
    assert [c["class_path"] for c in trainer["callbacks"]] == [
        "benchmarks.gpu_check_probes.PhaseTimer"
    ]
    assert model["model_name_or_path"] == "/nodes/model"
    assert model["perception_loss"]["class_path"].endswith("ContrastivePerception")  # CPPO
    tokens = GPU.new_tokens[part]
    assert rollout["max_new_tokens"] == tokens and rollout["group_size"] == 8
    assert rollout["engine"] == {
        "class_path": "cppo_lightning.rollout.HFGenerate",
        "init_args": {"min_new_tokens": tokens},
    }
    assert config["data"]["batch_size"] == 8 and config["data"]["min_pixels"] == 448 * 448
    if part.startswith("lora"):
        assert model["lora"]["r"] == 64 and model["dtype"] == "bfloat16"
    else:
        assert model["lora"] is None and model["dtype"] == "float32"
    strategy = trainer["strategy"]
    if part == "fsdp":  # the 8-GPU recipe's own strategy, on one device
        assert strategy["class_path"] == "lightning.pytorch.strategies.FSDPStrategy"
        wrapped = {path.rsplit(".", 1)[1] for path in strategy["init_args"]["auto_wrap_policy"]}
        assert wrapped == {"Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock"}
    else:
        assert strategy == "auto"


def test_the_built_model_sees_448_pixel_images_as_256_tokens(tiny_model_dir, tmp_path):  # type: ignore[no-untyped-def]
    shutil.copytree(tiny_model_dir, tmp_path / "model")
    use_qwen_pixels(tmp_path / "model")
    processor = load_processor(str(tmp_path / "model"))
    out = processor.image_processor(images=[Image.new("RGB", (448, 448))], return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, 32, 32]]  # 1,024 patches, 2 x 2 merged: 256
