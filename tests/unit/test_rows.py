"""Row handling: image decoding errors, pixel budgets, where images go in the prompt."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from cppo_lightning.data.rows import (
    DropReport,
    chat_content,
    fit_pixels,
    image_tensor,
    open_image,
    tensor_image,
)


def _png(size=(10, 20), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG")
    return buffer.getvalue()


def test_open_image_accepts_the_forms_datasets_stores(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(_png(mode="L"))
    assert open_image({"bytes": _png(), "path": None}).size == (10, 20)
    grey = open_image(str(path))
    assert grey.mode == "RGB"  # converted
    assert open_image("a.png", image_root=str(tmp_path)).size == (10, 20)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (None, "no image"),
        ({"bytes": None, "path": None}, "no image"),
        ({"bytes": b"junk", "path": None}, "undecodable image"),
        ("/no/such/file.png", "unreadable image file"),
        (3.5, "an image value of type float"),
    ],
)
def test_open_image_errors_say_what_is_wrong(value, message):
    with pytest.raises(ValueError, match=message):
        open_image(value)


def test_fit_pixels_keeps_the_aspect_and_the_budget():
    big = Image.new("RGB", (400, 200))
    small = fit_pixels(big, None, 20_000)
    assert small.width * small.height <= 20_000 and small.width == 2 * small.height
    tiny = fit_pixels(Image.new("RGB", (10, 5)), 5_000, None)
    assert tiny.width * tiny.height >= 4_900 and abs(tiny.width - 2 * tiny.height) <= 1
    assert fit_pixels(big, 1, 10**9) is big  # inside the budget: untouched


def test_images_go_to_their_placeholders_or_first():
    placed = chat_content("Compare <image> with <image> now.", 2, "Think.")
    assert [p["type"] for p in placed] == ["text", "image", "text", "image", "text"]
    assert placed[-1]["text"] == "now. Think."
    first = chat_content("<image>What is x?", 1, "Think.")
    assert first == [{"type": "image"}, {"type": "text", "text": "What is x? Think."}]
    # Placeholders that do not match the images: images first, placeholders removed.
    mismatch = chat_content("<image> and <image>", 1, "")
    assert mismatch == [{"type": "image"}, {"type": "text", "text": "and"}]


def test_drop_report_summary():
    report = DropReport("train", rows=10)
    report.update(["no image", "no image", "empty answer"])
    assert report.kept == 7
    assert report.summary() == "train: kept 7 of 10 rows; dropped 2 no image, 1 empty answer."


def test_tensor_image_inverts_image_tensor_and_clamps():
    image = Image.effect_noise((9, 7), 80).convert("RGB")
    assert tensor_image(image_tensor(image)).tobytes() == image.tobytes()
    out = tensor_image(torch.tensor([[[2.0]], [[-1.0]], [[0.5]]]))
    assert out.getpixel((0, 0)) == (255, 0, 128)
