"""Model/processor loading: the built-in path, and errors that say what to change."""

from __future__ import annotations

from pathlib import Path

import pytest

from cppo_lightning.policy import DEFAULT_MODEL, load_policy, load_processor, resolve_model_path


def test_builtin_resolves_to_a_packaged_hf_checkpoint():
    path = Path(resolve_model_path(DEFAULT_MODEL))
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert resolve_model_path("Qwen/Qwen2.5-VL-3B-Instruct") == "Qwen/Qwen2.5-VL-3B-Instruct"


def test_unknown_builtin_lists_the_available_ones():
    with pytest.raises(FileNotFoundError, match=r"available: \['tiny-qwen2\.5-vl'\]"):
        resolve_model_path("builtin:no-such-model")


def test_bad_dtype_is_named():
    with pytest.raises(ValueError, match="use float32, bfloat16 or float16"):
        load_policy(DEFAULT_MODEL, dtype="float33")


def test_checkpoint_without_a_processor_is_refused(tmp_path):
    tokenizer = load_processor(DEFAULT_MODEL).tokenizer
    tokenizer.save_pretrained(tmp_path)  # a text-only checkpoint: tokenizer, no image processor
    with pytest.raises((ValueError, OSError)):
        load_processor(str(tmp_path))
