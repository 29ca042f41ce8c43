"""Shared fixtures: tiny models built offline, small synthetic datasets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised tiny Qwen2.5-VL saved in Hugging Face format."""
    from cppo_lightning.tiny import build_random_tiny

    model, processor = build_random_tiny(seed=1, hidden_size=64, num_layers=2)
    path = tmp_path_factory.mktemp("tiny-random")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_policy(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    from cppo_lightning.policy import load_policy, load_processor

    return load_policy(str(tiny_model_dir)).eval(), load_processor(str(tiny_model_dir))


@pytest.fixture(scope="session")
def shapes_rows() -> list[dict]:
    from cppo_lightning.data.synthetic import build_dataset

    dataset = build_dataset(8, seed=3)
    return [dataset[i] for i in range(len(dataset))]
