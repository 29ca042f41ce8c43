"""Images: high-bit-depth files keep their brightness; missing and corrupt files are told apart
in the row report, with example file names."""

from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from cppo_lightning.data import VisionLanguageDataModule
from cppo_lightning.data.rows import open_image
from cppo_lightning.data.synthetic import build_dataset


def _png16(grey: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(grey.astype(np.uint16)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_16_bit_png_is_scaled_to_8_bits_not_clipped_to_white(tmp_path):
    """A 16-bit greyscale PNG (Pillow mode I;16) opens as the RGB image of its values / 257, so
    mid-grey stays mid-grey instead of turning almost white."""
    grey = np.array([[0, 257 * 64], [257 * 128, 65535]])
    path = tmp_path / "deep.png"
    path.write_bytes(_png16(grey))
    assert Image.open(path).mode in ("I;16", "I")  # what Pillow hands over for such a file
    image = open_image(str(path))
    assert image.mode == "RGB"
    assert np.asarray(image)[..., 0].tolist() == [[0, 64], [128, 255]]
    assert (np.asarray(image)[..., 0] == np.asarray(image)[..., 2]).all()


@pytest.mark.parametrize("mode", ["I", "F"])
def test_32_bit_integer_and_float_images_are_scaled_by_their_range(mode):
    """In-memory 32-bit integer images holding 16-bit values and float images in [0, 1] are
    scaled to 8 bits by that range, not clipped."""
    if mode == "I":
        image = Image.fromarray(np.array([[0, 257 * 100], [257 * 200, 65535]], dtype=np.int32))
    else:
        image = Image.fromarray(np.array([[0.0, 100 / 255], [200 / 255, 1.0]], dtype=np.float32))
    assert image.mode == mode
    assert np.asarray(open_image(image))[..., 1].tolist() == [[0, 100], [200, 255]]


def _broken_dataset(tmp_path: Path) -> datasets.Dataset:
    ds = build_dataset(5, seed=0)
    rows = ds.cast_column("image", datasets.Image(decode=False)).to_list()
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"this is not a png")
    rows[1]["image"] = {"bytes": None, "path": str(corrupt)}
    rows[2]["image"] = {"bytes": None, "path": str(tmp_path / "gone.png")}
    rows[3]["image"] = None
    features = ds.features.copy()
    features["image"] = datasets.Image(decode=False)
    return datasets.Dataset.from_list(rows, features=features)


class _InMemory:
    def __init__(self, train: datasets.Dataset, validation: datasets.Dataset) -> None:
        self.splits = datasets.DatasetDict(train=train, validation=validation)

    def load(self) -> datasets.DatasetDict:
        return self.splits


def test_missing_and_unreadable_images_are_separate_drop_reasons_with_file_names(
    tmp_path, tiny_model_dir
):
    """A missing image file and a corrupt one are counted under different reasons ('image file
    missing', 'unreadable image'), and the report and its summary name an example file of
    each."""
    module = VisionLanguageDataModule(
        dataset=_InMemory(_broken_dataset(tmp_path), build_dataset(2, seed=1)),
        processor_name_or_path=str(tiny_model_dir),
        batch_size=1,
    )
    module.setup("fit")
    report = module.reports["train"]
    assert dict(report) == {"no image": 1, "unreadable image": 1, "image file missing": 1}
    assert report.examples["image file missing"] == [str(tmp_path / "gone.png")]
    assert report.examples["unreadable image"] == [str(tmp_path / "corrupt.png")]
    assert "gone.png" in report.summary() and "corrupt.png" in report.summary()


def test_the_data_report_file_lists_example_files_per_reason(tmp_path, tiny_model_dir):
    """data_report.json keeps its rows/kept/dropped keys and adds `examples`: a few file names
    per drop reason."""
    from lightning.pytorch import Trainer

    module = VisionLanguageDataModule(
        dataset=_InMemory(_broken_dataset(tmp_path), build_dataset(2, seed=1)),
        processor_name_or_path=str(tiny_model_dir),
        batch_size=1,
    )
    trainer = Trainer(default_root_dir=str(tmp_path / "run"), logger=False)
    trainer.log_dir  # noqa: B018 (no logger: the default_root_dir)
    module.trainer = trainer
    module.setup("fit")
    written = json.loads((Path(trainer.log_dir) / "data_report.json").read_text())
    train = written["train"]
    assert {"rows", "kept", "dropped", "examples"} <= set(train)
    assert train["dropped"]["image file missing"] == 1
    assert train["examples"]["image file missing"] == [str(tmp_path / "gone.png")]
    assert written["validation"]["examples"] == {}
