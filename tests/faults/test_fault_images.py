"""Images: high-bit-depth files keep their brightness; transparent ones are composited onto
white and EXIF-rotated ones turned upright; huge ones are shrunk while decoded without changing
what the processor makes of them; missing and corrupt files and URLs are told apart in the row
report, with example file names."""

from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from cppo_lightning.data import DatasetSpec, HFDataset, VisionLanguageDataModule
from cppo_lightning.data import rows as row_handling
from cppo_lightning.data.datamodule import PromptCollator
from cppo_lightning.data.rows import (
    IMAGE_URL,
    DecodeBound,
    decode_bound,
    fit_pixels,
    open_image,
)
from cppo_lightning.data.synthetic import build_dataset
from cppo_lightning.evaluation.sets import EvalSet
from cppo_lightning.policy import load_processor


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


# --------------------------------------------------------------- transparency, EXIF, huge images
def _diagram(mode: str) -> Image.Image:
    """A 56 x 56 black-on-transparent diagram: one black line across row 28, nothing else."""
    if mode == "P":
        image = Image.new("P", (56, 56), 0)
        image.putpalette([0, 0, 0, 0, 0, 0])  # index 0 (transparent) and 1 (the line): black
        image.info["transparency"] = 0
        ImageDraw.Draw(image).line([(0, 28), (55, 28)], fill=1, width=3)
        return image
    image = Image.new(mode, (56, 56), (0, 0, 0, 0) if mode == "RGBA" else (0, 0))
    ImageDraw.Draw(image).line([(0, 28), (55, 28)], fill=(0, 0, 0, 255)[-len(mode) :], width=3)
    return image


def _save(image: Image.Image, path: Path, **kwargs: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if image.mode == "P":
        kwargs.setdefault("transparency", 0)
    image.save(path, **kwargs)
    return path


def _assert_white_with_a_black_line(image: Image.Image | torch.Tensor) -> None:
    if isinstance(image, torch.Tensor):  # [3, H, W] in [0, 1]
        array = image.mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    else:
        array = np.asarray(image)
    assert array.shape == (56, 56, 3)
    assert (array[5] == 255).all() and (array[50] == 255).all()  # background: white
    assert (array[28] == 0).all()  # the line: still black


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_a_transparent_png_keeps_its_lines_in_training_rows(tmp_path, mode):
    """A black-on-transparent PNG (RGBA, LA, or a palette image with a transparency index) is
    composited onto white, as transformers' convert_to_rgb does; before, the transparent
    background became black and every line was lost. Checked on the collator's batch images."""
    path = _save(_diagram(mode), tmp_path / f"diagram-{mode}.png")
    collator = PromptCollator(load_processor("builtin:tiny-qwen2.5-vl"), "", keep_images=True)
    batch = collator(
        [{"question": "<image>What is drawn?", "answer": "a line", "image": str(path)}]
    )
    assert batch.images is not None
    _assert_white_with_a_black_line(batch.images[0])


@pytest.mark.parametrize("mode", ["RGBA", "P"])
def test_a_transparent_png_keeps_its_lines_in_an_eval_set(tmp_path, mode):
    """The same through an evaluation set read from a jsonl file (its image paths relative)."""
    _save(_diagram(mode), tmp_path / "images" / "d.png")
    data = tmp_path / "test.jsonl"
    data.write_text(json.dumps({"question": "q", "answer": "1", "image": "images/d.png"}) + "\n")
    eval_set = EvalSet("diagrams", DatasetSpec(path=str(data)))
    rows, report = eval_set.load(load_processor("builtin:tiny-qwen2.5-vl"))
    assert report.kept == 1
    _assert_white_with_a_black_line(eval_set.images(rows[0])[0])


def test_a_jpeg_with_exif_orientation_6_comes_out_rotated(tmp_path):
    """A JPEG stored sideways with EXIF orientation 6 (a phone's portrait photo) is turned
    upright: the 40 x 20 stored image, red on its left and blue on its right, comes out
    20 x 40 with red on top (orientation 6: turn 90 degrees clockwise to display)."""
    stored = Image.new("RGB", (40, 20), (255, 0, 0))
    stored.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "portrait.jpg"
    stored.save(path, format="JPEG", exif=exif.tobytes(), quality=95)
    eval_set = EvalSet("portraits", DatasetSpec(path="x.jsonl"))
    for image in (open_image(str(path)), eval_set.images({"image": str(path)})[0]):
        assert image.size == (20, 40)
        top, bottom = np.asarray(image)[5, 10], np.asarray(image)[35, 10]
        assert top[0] > 200 and top[2] < 60, top  # red
        assert bottom[2] > 200 and bottom[0] < 60, bottom  # blue


def _photo(size: tuple[int, int]) -> Image.Image:
    """A smooth image (gradients and a disc): what a resize treats like a photo or a scan."""
    width, height = size
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    array = np.stack([x + 0 * y, y + 0 * x, 255 - (x + y) / 2], axis=-1).astype(np.uint8)
    image = Image.fromarray(array)
    ImageDraw.Draw(image).ellipse(
        [width // 4, height // 4, width // 2, height // 2], fill=(0, 0, 0)
    )
    return image


@pytest.mark.parametrize(
    ("size", "file_format", "max_pixels", "decoded"),
    [
        # No data.max_pixels: the processor's budget, 112 x 112 = 12544 pixels, bounds it; the
        # decode keeps >= 4 x 12544 pixels: 2048 x 1536 / 4 = 512 x 384 (/ 8 would be too few).
        ((2048, 1536), "PNG", None, (512, 384)),
        ((2048, 1536), "JPEG", None, (512, 384)),
        # data.max_pixels = 512 x 512 bounds it: 4000 / 2 = 2000 >= 2 x 512, 4000 / 4 is not.
        ((4000, 4000), "JPEG", 512 * 512, (2000, 2000)),
    ],
)
def test_a_huge_image_is_reduced_while_decoded_and_gives_the_same_shapes(
    tmp_path, monkeypatch, size, file_format, max_pixels, decoded
):
    """A large image is shrunk by a power of two while it is decoded (JPEG: at decode, others
    right after), before any float copy; the processor's output has the same shapes (pixel
    values, image grid, prompt tokens) as for the image decoded whole, and nearly the same
    values. Before, the whole image went to the processor (a 4000 x 4000 image: 3.3 GB more
    peak memory for 112 x 112 pixels)."""
    path = tmp_path / f"big.{file_format.lower()}"
    _photo(size).save(path, format=file_format, quality=95)
    processor = load_processor("builtin:tiny-qwen2.5-vl")
    collator = PromptCollator(processor, "", max_pixels=max_pixels)
    seen: list[tuple[int, int]] = []  # the decoded sizes, as the resize step receives them

    def fit(image: Image.Image, *budget: int | None) -> Image.Image:
        seen.append(image.size)
        return fit_pixels(image, *budget)

    monkeypatch.setattr(row_handling, "fit_pixels", fit)
    row = {"question": "<image>What is shown?", "answer": "a disc", "image": str(path)}
    batch = collator([row])
    assert seen == [decoded]

    whole = fit_pixels(Image.open(path).convert("RGB"), None, max_pixels)  # as before
    before = processor(text=[collator.prompt(row, 1)], images=[whole], return_tensors="pt")
    assert batch.vision["pixel_values"].shape == before["pixel_values"].shape
    assert torch.equal(batch.vision["image_grid_thw"], before["image_grid_thw"])
    assert torch.equal(batch.input_ids, before["input_ids"])
    difference = (batch.vision["pixel_values"] - before["pixel_values"]).abs().mean()
    assert difference < 0.05, difference  # normalised values: a different filter, same image


def test_the_decode_bound_keeps_odd_sizes_whole_and_reads_the_processors_budget():
    """The decode shrinks by the largest power of two that divides both sides and keeps 4 x
    the pixel budget (2 x the edge for edge budgets); an image with an odd side is decoded
    whole (shrinking it would change its aspect ratio). The budget is data.max_pixels, else
    the processor's: Qwen's max_pixels, Idefics3's longest edge, CLIP's shortest edge."""
    from transformers import CLIPImageProcessorPil, Idefics3ImageProcessorPil

    qwen = load_processor("builtin:tiny-qwen2.5-vl").image_processor
    assert decode_bound(None, qwen) == DecodeBound(pixels=112 * 112)
    assert decode_bound(512 * 512, qwen) == DecodeBound(pixels=512 * 512)
    assert decode_bound(None, Idefics3ImageProcessorPil()) == DecodeBound(longest_edge=1456)
    assert decode_bound(None, CLIPImageProcessorPil()) == DecodeBound(shortest_edge=224)
    assert decode_bound(None, None) == DecodeBound()
    bound = DecodeBound(pixels=112 * 112)  # keep >= 50176 pixels
    assert bound.factor(4000, 4000) == 16  # 250 x 250; 125 x 125 would be too few
    assert bound.factor(4000, 4001) == 1  # an odd side: decoded whole
    assert bound.factor(448, 448) == 2  # 224 x 224 = 50176 pixels: just enough
    assert bound.factor(446, 446) == 1  # 223 x 223 would be too few
    assert DecodeBound(longest_edge=1456).factor(6000, 4000) == 2  # 3000 >= 2912 > 1500
    assert DecodeBound(shortest_edge=224).factor(4000, 1000) == 2  # 500 >= 448 > 250
    assert DecodeBound().factor(4000, 4000) == 1  # no budget: decoded whole


def test_an_image_url_is_dropped_and_counted_as_not_fetched(tmp_path, tiny_model_dir):
    """A row whose image column holds a URL is dropped under its own reason, which says URLs
    are not fetched and what to do, with the URL (not a folder joined onto it) as the example.
    Before, it was counted as 'image file missing' with a mangled path ('<folder>/https:/...')."""
    _save(_photo((56, 56)), tmp_path / "images" / "ok.png")
    data = tmp_path / "train.jsonl"
    rows = [{"question": f"q{i}", "answer": str(i), "image": "images/ok.png"} for i in range(3)]
    rows.append({"question": "q", "answer": "1", "image": "https://example.com/a.png"})
    rows.append({"question": "q", "answer": "1", "image": "http://example.com/b.png"})
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    spec = DatasetSpec(path=str(data))
    module = VisionLanguageDataModule(
        dataset=HFDataset(train=spec, validation=spec),
        processor_name_or_path=str(tiny_model_dir),
        batch_size=1,
    )
    module.setup("fit")
    report = module.reports["train"]
    assert dict(report) == {IMAGE_URL: 2} and report.kept == 3
    assert "not fetched" in IMAGE_URL and "local files" in IMAGE_URL
    assert report.examples[IMAGE_URL] == ["https://example.com/a.png", "http://example.com/b.png"]
    assert "not fetched" in report.summary()
