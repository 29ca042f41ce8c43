"""`cppo export`: a LoRA-trained checkpoint becomes a plain Hugging Face checkpoint that
transformers loads in a process that never imports this package, with the same logits."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from cppo_lightning import cli as cli_module
from cppo_lightning.cli import main
from cppo_lightning.data.datamodule import PromptCollator
from tests.e2e.test_fit import _fit_args

STANDALONE = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModelForImageTextToText
    model = AutoModelForImageTextToText.from_pretrained(sys.argv[1]).eval()
    inputs = torch.load(sys.argv[2])
    with torch.no_grad():
        torch.save(model(**inputs).logits, sys.argv[3])
    assert not any(name.startswith("cppo_lightning") for name in sys.modules)
    """
)


def test_exported_lora_policy_gives_the_same_logits_without_this_package(
    tmp_path, shapes_rows, monkeypatch
):
    cli = main(
        _fit_args(
            tmp_path,
            "--trainer.max_steps=1",
            "--trainer.val_check_interval=1",
            "--trainer.callbacks=[]",
            "--model.val_samples=1",
            "--model.lora={r: 4, alpha: 8}",
        )
    )
    module = cli.model
    checkpoint = tmp_path / "trained.ckpt"
    cli.trainer.save_checkpoint(checkpoint)
    stored = torch.load(checkpoint, weights_only=False)["state_dict"]
    assert stored and all("lora_" in key for key in stored)  # adapters only

    output = tmp_path / "exported"
    monkeypatch.setattr(sys, "argv", ["cppo", "export", str(checkpoint), str(output)])
    cli_module.entry_point()

    prompts = PromptCollator(module.processor, "Answer.")(shapes_rows[:2])
    inputs = {
        "input_ids": prompts.input_ids,
        "attention_mask": prompts.attention_mask,
        "mm_token_type_ids": prompts.mm_token_type_ids,
        **prompts.vision,
    }
    torch.save(inputs, tmp_path / "inputs.pt")
    policy = module.policy.eval()
    with torch.no_grad():
        expected = policy(**inputs).logits
        base = policy.get_base_model()
        with policy.disable_adapter():
            untrained = base(**inputs).logits
    assert not torch.allclose(expected, untrained), "the LoRA step changed nothing to compare"

    subprocess.run(
        [
            sys.executable,
            "-c",
            STANDALONE,
            str(output),
            str(tmp_path / "inputs.pt"),
            str(tmp_path / "logits.pt"),
        ],
        check=True,
    )
    exported = torch.load(tmp_path / "logits.pt")
    torch.testing.assert_close(exported, expected, rtol=1e-4, atol=1e-5)
    processor_config = json.loads((output / "processor_config.json").read_text())
    assert processor_config["processor_class"] == "Qwen2_5_VLProcessor"
    assert not list(output.glob("adapter_*")), "LoRA must be merged, not saved as an adapter"


def test_export_names_a_missing_checkpoint(tmp_path):
    from cppo_lightning.export import export_checkpoint

    with pytest.raises(FileNotFoundError, match=r"give the \.ckpt that `cppo fit` wrote"):
        export_checkpoint(tmp_path / "nope.ckpt", tmp_path / "out")


def test_export_refuses_a_file_that_is_not_a_fit_checkpoint(tmp_path):
    from cppo_lightning.export import export_checkpoint

    other = tmp_path / "weights.ckpt"
    torch.save({"model": {}}, other)
    with pytest.raises(ValueError, match="is not a checkpoint written by `cppo fit`"):
        export_checkpoint(other, tmp_path / "out")
