"""Exports are whole or absent, readable by the user's group as the umask says, and load with
`AutoProcessor` like the original model: a disk that fills during the end-of-fit export leaves
no half-written hf_policy/; checkpoints and exports get the umask's permissions, not 0600/0700."""

from __future__ import annotations

import errno
import importlib.util
import os
import stat
from pathlib import Path

import pytest
import torch
from PIL import Image

from cppo_lightning.checkpoints import AtomicCheckpointIO
from cppo_lightning.cli import main
from cppo_lightning.export import main as export_main
from cppo_lightning.module import CPPOModule
from tests.helpers.runs import fit_args


def _checkpoint(uninterrupted: tuple[Path, dict], step: int = 2) -> Path:
    root, _ = uninterrupted
    (checkpoint,) = root.rglob(f"step={step}.ckpt")
    return checkpoint


def test_a_disk_that_fills_during_the_end_of_fit_export_leaves_no_half_export(
    tmp_path, monkeypatch
):
    """Promise: the end-of-fit export (ExportPolicy) is written next to hf_policy/ and renamed
    into place: a write that fails half way (here: config files written, then the disk is full)
    leaves no hf_policy/ and no temporary folder, and the run stops with an error that names the
    folder and the `cppo export` command for the last checkpoint. It left hf_policy/ with config
    files and no weights under its final name."""

    def fill_the_disk(self: CPPOModule, directory: str) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)  # as save_pretrained does
        (Path(directory) / "config.json").write_text("{}")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(CPPOModule, "save_pretrained", fill_the_disk)
    with pytest.raises(Exception, match="hf_policy") as raised:
        main(fit_args(tmp_path, steps=1))
    message = str(raised.value)
    assert "No space left on device" in message and "cppo export" in message
    (log_dir,) = (tmp_path / "lightning_logs").iterdir()
    assert not (log_dir / "hf_policy").exists()
    assert not [p.name for p in log_dir.iterdir() if p.name.startswith(".")]
    assert (log_dir / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_checkpoints_and_exports_get_the_permissions_the_umask_gives(
    tmp_path, uninterrupted, umask
):
    """Promise: a checkpoint file is 0666 and an export folder 0777, less the umask (0644 and
    0755 under umask 022), as files and folders the process creates itself. They were 0600 and
    0700 (mkstemp's and mkdtemp's private modes), unreadable to the user's group."""
    before = os.umask(umask)
    try:
        AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(2)}, tmp_path / "a.ckpt")
        export_main([str(_checkpoint(uninterrupted)), str(tmp_path / "exported")])
    finally:
        os.umask(before)
    assert stat.S_IMODE((tmp_path / "a.ckpt").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "exported").stat().st_mode) == 0o777 & ~umask
    for file in (tmp_path / "exported").iterdir():
        assert stat.S_IMODE(file.stat().st_mode) == 0o666 & ~umask, file.name


def test_an_export_loads_with_auto_processor_as_the_stock_processor(
    tmp_path, uninterrupted, monkeypatch
):
    """Promise: `AutoProcessor.from_pretrained(export)` builds the stock Qwen2_5_VLProcessor, as
    for the original model: its files name the stock class and hold the video processor's
    settings that class loads (through torchvision; here a stand-in for torchvision's video
    processor), and it prepares an image and a prompt exactly as this package's processor does.
    Without torchvision it fails, as the original model's does, by asking for torchvision. The
    export held no video processor settings, so AutoProcessor failed even with torchvision
    (`Can't load video processor ...`)."""
    from transformers import AutoProcessor, processing_utils
    from transformers.models.auto import video_processing_auto
    from transformers.video_processing_utils import BaseVideoProcessor, VideoProcessorMixin

    from cppo_lightning.policy import load_processor

    output = tmp_path / "exported"
    export_main([str(_checkpoint(uninterrupted)), str(output)])
    if importlib.util.find_spec("torchvision") is None:
        with pytest.raises(ImportError, match="Torchvision"):
            AutoProcessor.from_pretrained(output)

    class TorchvisionVideoProcessor(BaseVideoProcessor):
        """Stands in for Qwen2VLVideoProcessor, which needs torchvision."""

    by_name = video_processing_auto.video_processor_class_from_name
    # Without torchvision, transformers exports no video processor base class for its checks.
    exported = processing_utils.transformers_module
    monkeypatch.setattr(exported, "VideoProcessorMixin", VideoProcessorMixin, raising=False)
    monkeypatch.setattr(
        video_processing_auto,
        "video_processor_class_from_name",
        lambda name: (
            TorchvisionVideoProcessor if name == "Qwen2VLVideoProcessor" else by_name(name)
        ),
    )
    processor = AutoProcessor.from_pretrained(output)
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    assert processor.video_processor.patch_size == processor.image_processor.patch_size

    ours = load_processor(str(output))
    image = Image.new("RGB", (112, 112), (200, 30, 30))
    text = ours.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}],
        add_generation_prompt=True,
    )
    expected = ours(images=[image], text=[text], return_tensors="pt")
    got = processor(images=[image], text=[text], return_tensors="pt")
    for key in ("input_ids", "pixel_values", "image_grid_thw"):
        torch.testing.assert_close(got[key], expected[key])
