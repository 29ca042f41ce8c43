"""From a dataset row to what the processor takes: images decoded and sized, the chat prompt built.

Rows reach the collator with canonical columns ``question``, ``answer`` and ``image`` (one image
or a list of images: PIL images, ``{"bytes", "path"}`` dicts as ``datasets`` stores them, or file
paths). :func:`prepare_split` runs the same code over a whole split once, before training, and
drops the rows that cannot be trained on, counting why.
"""

from __future__ import annotations

import collections
import io
import math
import os
from collections.abc import Callable
from typing import Any

import datasets
import numpy as np
import torch
from datasets.fingerprint import Hasher
from PIL import Image

# The paper's prompt format (reasoning in <think>, answer in \boxed{}), worded as in the
# EasyR1/verl math prompt that the CPPO and PAPO recipes build on.
PAPER_INSTRUCTION = (
    "You FIRST think about the reasoning process as an internal monologue and then provide the "
    "final answer. The reasoning process MUST BE enclosed within <think> </think> tags. The final "
    "answer MUST BE put in \\boxed{}."
)

IMAGE_PLACEHOLDER = "<image>"  # how ViRL39K / Geometry3K mark an image's place in the question


class ImageError(ValueError):
    """An image that cannot be used, with the drop ``reason`` it is counted under and the
    ``file`` it came from (None for embedded bytes or no value)."""

    def __init__(self, message: str, reason: str, file: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.file = file


NO_IMAGE = "no image"
IMAGE_MISSING = "image file missing"
IMAGE_UNREADABLE = "unreadable image"


def open_image(value: Any, image_root: str | None = None) -> Image.Image:
    """Decode one image value (PIL, ``{"bytes", "path"}`` dict, or path) into 8-bit RGB.

    Raises:
        ImageError: The value is empty (reason ``no image``), the file is missing (``image file
            missing``), or it cannot be read or decoded (``unreadable image``).
    """
    if isinstance(value, Image.Image):
        image = value
    else:
        data = path = None
        if isinstance(value, dict):
            data, path = value.get("bytes"), value.get("path")
        elif isinstance(value, str):
            path = value
        elif value is not None:
            raise ImageError(f"an image value of type {type(value).__name__}", IMAGE_UNREADABLE)
        if not data and not path:
            raise ImageError(NO_IMAGE, NO_IMAGE)
        if not data:
            assert path is not None
            if image_root is not None and not os.path.isabs(path):
                path = os.path.join(image_root, path)
            try:
                with open(path, "rb") as handle:
                    data = handle.read()
            except OSError as error:
                reason = IMAGE_MISSING if isinstance(error, FileNotFoundError) else IMAGE_UNREADABLE
                raise ImageError(
                    f"unreadable image file {path!r}: {error}", reason, path
                ) from error
        try:
            image = Image.open(io.BytesIO(data))
            image.load()
        except Exception as error:  # PIL raises several types for bad data
            where = f" {path!r}" if path else ""
            raise ImageError(
                f"undecodable image{where} ({type(error).__name__}: {error})",
                IMAGE_UNREADABLE,
                path or None,
            ) from error
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB. High-bit-depth greyscale (16-bit PNGs open as mode ``I;16`` or ``I``, float
    TIFFs as ``F``) is scaled by its range: Pillow's own conversion clips it to 0..255, which
    turns a 16-bit image almost white."""
    if image.mode == "RGB":
        return image
    if image.mode not in ("I", "F") and not image.mode.startswith("I;16"):
        return image.convert("RGB")
    array = np.asarray(image, dtype=np.float64)  # [H, W]
    peak = float(array.max()) if array.size else 0.0
    if image.mode.startswith("I;16"):
        top = 65535.0
    elif image.mode == "F" and peak <= 1.0:
        top = 1.0  # float images in [0, 1]
    elif peak <= 255.0:
        top = 255.0  # 8-bit values held in a wider mode
    elif peak <= 65535.0:
        top = 65535.0  # 16-bit values (older Pillow opens 16-bit PNGs as mode I)
    else:
        top = peak
    grey = np.clip(np.round(array * (255.0 / top)), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


def drop_reason(error: ValueError) -> tuple[str, str | None]:
    """The drop reason of an image error, and the file it names (None if none)."""
    if isinstance(error, ImageError):
        return error.reason, error.file
    return (NO_IMAGE if str(error) == NO_IMAGE else IMAGE_UNREADABLE), None


def image_values(value: Any) -> list[Any]:
    """The image column of a row as a list (one entry per image)."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def fit_pixels(image: Image.Image, min_pixels: int | None, max_pixels: int | None) -> Image.Image:
    """Resize (aspect kept) so that H x W lies within ``[min_pixels, max_pixels]``."""
    pixels = image.width * image.height
    scale = 1.0
    if max_pixels is not None and pixels > max_pixels:
        scale = math.sqrt(max_pixels / pixels)
    elif min_pixels is not None and pixels < min_pixels:
        scale = math.sqrt(min_pixels / pixels)
    if scale == 1.0:
        return image
    size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)


def chat_content(question: str, num_images: int, instruction: str) -> list[dict[str, str]]:
    """The user turn: images at their ``<image>`` placeholders when the question has exactly one
    per image, else all images first; the instruction after the question."""
    segments = question.split(IMAGE_PLACEHOLDER)
    content: list[dict[str, str]] = []
    if len(segments) - 1 == num_images and num_images > 0:
        for i, segment in enumerate(segments):
            if i > 0:
                content.append({"type": "image"})
            if segment.strip():
                content.append({"type": "text", "text": segment.strip()})
    else:
        content = [{"type": "image"}] * num_images
        text = " ".join(s.strip() for s in segments if s.strip())
        if text:
            content.append({"type": "text", "text": text})
    if instruction:
        if content and content[-1]["type"] == "text":
            content[-1] = {"type": "text", "text": f"{content[-1]['text']} {instruction}"}
        else:
            content.append({"type": "text", "text": instruction})
    return content


def format_prompt(processor: Any, question: str, instruction: str = "", num_images: int = 1) -> str:
    """The chat-formatted prompt text of a question with ``num_images`` images."""
    messages = [{"role": "user", "content": chat_content(question, num_images, instruction)}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


class DropReport(collections.Counter):
    """Rows dropped from a split, by reason; ``kept`` and ``rows`` count rows, ``examples`` holds
    up to :attr:`MAX_EXAMPLES` file names per reason (for reasons that come with a file)."""

    MAX_EXAMPLES = 3

    def __init__(self, split: str, rows: int = 0) -> None:
        super().__init__()
        self.split = split
        self.rows = rows
        self.examples: dict[str, list[str]] = {}

    def update(self, other: Any = None, /, **kwargs: int) -> None:  # type: ignore[override]
        super().update(other, **kwargs)
        if isinstance(other, DropReport):
            for reason, files in other.examples.items():
                for file in files:
                    self.add_example(reason, file)

    def add_example(self, reason: str, file: str) -> None:
        files = self.examples.setdefault(reason, [])
        if len(files) < self.MAX_EXAMPLES and file not in files:
            files.append(file)

    @property
    def kept(self) -> int:
        return self.rows - sum(self.values())

    def summary(self) -> str:
        def entry(reason: str, count: int) -> str:
            files = self.examples.get(reason)
            return f"{count} {reason}" + (f" (e.g. {', '.join(files)})" if files else "")

        dropped = ", ".join(entry(reason, count) for reason, count in self.most_common())
        return (
            f"{self.split}: kept {self.kept} of {self.rows} rows"
            + (f"; dropped {dropped}" if dropped else "")
            + "."
        )


RowCheck = Callable[[dict[str, Any]], "str | tuple[str, str | None] | None"]


def prepare_split(
    dataset: datasets.Dataset,
    split: str,
    check: RowCheck,
    num_proc: int | None = None,
    settings: Any = None,
) -> tuple[datasets.Dataset, DropReport]:
    """Drop the rows for which ``check(row)`` names a reason; count the reasons.

    ``check`` returns None to keep a row, else the reason, or the reason and the file it
    concerns (kept as an example in the report). It decodes the images and, if asked, counts
    the prompt's tokens. Runs through ``datasets.map``. For datasets read from files or the hub,
    the result is cached under a fingerprint of the dataset and ``settings`` (everything
    ``check`` depends on), so a second call with the same ones, e.g. on another rank after
    ``prepare_data``, or on a restart, reads the cache instead of checking again.
    """
    report = DropReport(split, len(dataset))
    fingerprint = None
    if settings is not None:
        fingerprint = Hasher.hash((dataset._fingerprint, "cppo-row-check-v2", settings))

    def mark(row: dict[str, Any]) -> dict[str, str]:
        found = check(row)
        reason, file = found if isinstance(found, tuple) else (found, None)
        return {"__drop__": reason or "", "__drop_file__": file or ""}

    marked = dataset.map(
        mark,
        num_proc=num_proc if num_proc and num_proc > 1 else None,
        desc=f"checking {split} rows",
        new_fingerprint=fingerprint,
    )
    reasons = marked["__drop__"]
    report.update(reason for reason in reasons if reason)
    if not any(reasons):
        return dataset, report
    for reason, file in zip(reasons, marked["__drop_file__"], strict=True):
        if reason and file:
            report.add_example(reason, file)
    keep = [i for i, reason in enumerate(reasons) if not reason]
    return dataset.select(keep), report


def row_images(
    row: dict[str, Any], image_column: str, min_pixels: int | None, max_pixels: int | None
) -> list[Image.Image]:
    """Decode and size the images of one row (raises ValueError for a bad or missing image).
    Relative paths were made absolute when the dataset was loaded (``DatasetSpec``)."""
    values = image_values(row[image_column])
    if not values:
        raise ImageError(NO_IMAGE, NO_IMAGE)
    return [fit_pixels(open_image(v), min_pixels, max_pixels) for v in values]


def empty(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def element_feature(feature: Any) -> Any:
    """The element feature of a list column (``List``, ``Sequence`` or ``[feature]``), or None."""
    if isinstance(feature, list):
        return feature[0] if feature else None
    return getattr(feature, "feature", None)


def image_tensor(image: Image.Image) -> torch.Tensor:
    """``[3, H, W]`` float32 in [0, 1] (what the processor gives for the PIL image too)."""
    array = np.array(image, dtype=np.uint8, copy=True)  # [H, W, 3]
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)


def tensor_image(tensor: torch.Tensor) -> Image.Image:
    """The RGB image of a ``[3, H, W]`` tensor in [0, 1], clamped and rounded to 8 bits (the
    inverse of :func:`image_tensor` up to that rounding)."""
    array = tensor.clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array, mode="RGB")


def undecoded_images(dataset: datasets.Dataset, column: str) -> datasets.Dataset:
    """Keep an image column as bytes/paths: images are decoded by the collator, which can skip a
    corrupt one instead of failing inside ``datasets``."""
    feature = dataset.features[column]
    if isinstance(feature, datasets.Image):
        return dataset.cast_column(column, datasets.Image(decode=False))
    if isinstance(element_feature(feature), datasets.Image):
        return dataset.cast_column(column, datasets.List(datasets.Image(decode=False)))
    return dataset
