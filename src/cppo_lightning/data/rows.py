"""From a dataset row to what the processor takes: images decoded and sized, the chat prompt built.

Rows reach the collator with canonical columns ``question``, ``answer`` and ``image`` (one image
or a list of images: PIL images, ``{"bytes", "path"}`` dicts as ``datasets`` stores them, or file
paths). :func:`prepare_split` runs the same code over a whole split once, before training, and
drops the rows that cannot be trained on, counting why.

Every image, in training rows and evaluation sets alike, is decoded by :func:`open_image`: turned
upright by its EXIF orientation, its transparent pixels composited onto white (as transformers'
``convert_to_rgb`` does), converted to 8-bit RGB and, when it is far larger than the pixel budget,
shrunk while it is decoded (:class:`DecodeBound`).
"""

from __future__ import annotations

import collections
import dataclasses
import io
import math
import os
import re
from collections.abc import Callable
from typing import Any

import datasets
import numpy as np
import torch
from datasets.fingerprint import Hasher
from PIL import Image, ImageOps

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
IMAGE_URL = "image URL, not fetched (download the images and point the image column at local files)"

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")  # http://, https://, s3://, ...
# A URL joined onto a folder (``root/https://...``), as older versions made it when loading.
_JOINED_URL = re.compile(r"(?:^|[/\\])([A-Za-z][A-Za-z0-9+.-]*://.*)$")
_EXIF_ORIENTATION = 0x0112


@dataclasses.dataclass(frozen=True)
class DecodeBound:
    """How far an image may be shrunk while it is decoded, before any resize.

    A huge image (a 4000 x 4000 scan) is shrunk by the largest power of two (2, 4, 8, ...) that
    divides both its sides and leaves at least twice the side length that the later resize
    (``data.max_pixels``, or the processor's own budget) keeps: at least 4 x ``pixels`` pixels,
    a longest side of at least 2 x ``longest_edge``, a shortest side of at least
    2 x ``shortest_edge``. JPEGs are decoded at that scale (Pillow's ``draft``); other formats
    are decoded whole and reduced at once (``Image.reduce``), before the processor converts the
    image to floats. Because the factor is a power of two that divides both sides, the aspect
    ratio is kept exactly (bit for bit in floating point), so every later resize (``fit_pixels``,
    Qwen's ``smart_resize``, Idefics3's longest-edge and CLIP's shortest-edge resizes) gives the
    same size it gives for the whole image: the same image tokens and ``pixel_values`` shape.
    The pixel values differ slightly (a box filter or the JPEG decoder's scaling comes before
    the resize's bicubic filter). An image with an odd side is decoded whole.

    Attributes:
        pixels: Pixel budget of the resize (H x W), or None.
        longest_edge: Longest side the resize keeps, or None.
        shortest_edge: Shortest side the resize keeps, or None.
    """

    pixels: int | None = None
    longest_edge: int | None = None
    shortest_edge: int | None = None

    def factor(self, width: int, height: int) -> int:
        """The power of two to shrink a ``width`` x ``height`` image by (1: decode it whole)."""
        if self.pixels is None and self.longest_edge is None and self.shortest_edge is None:
            return 1
        factor = 1
        while width % (2 * factor) == 0 and height % (2 * factor) == 0:
            if not self._keeps(width // (2 * factor), height // (2 * factor)):
                break
            factor *= 2
        return factor

    def _keeps(self, width: int, height: int) -> bool:
        if self.pixels is not None and width * height < 4 * self.pixels:
            return False
        if self.longest_edge is not None and max(width, height) < 2 * self.longest_edge:
            return False
        return self.shortest_edge is None or min(width, height) >= 2 * self.shortest_edge


def is_url(value: str) -> bool:
    """Whether ``value`` is a URL (``http://``, ``https://``, ``s3://``...), not a path."""
    return _URL.match(value) is not None


def decode_bound(max_pixels: int | None, image_processor: Any = None) -> DecodeBound:
    """The :class:`DecodeBound` of images resized to ``max_pixels`` (``data.max_pixels``, the
    resize that comes first) or, when that is None, by ``image_processor``: Qwen's ``max_pixels``
    (transformers 5 keeps it in ``size["longest_edge"]``), Idefics3's ``longest_edge``, CLIP's
    ``shortest_edge``. Unbounded when neither is known."""
    if max_pixels is not None:
        return DecodeBound(pixels=max_pixels)
    if image_processor is None:
        return DecodeBound()
    size = getattr(image_processor, "size", None)

    def read(key: str) -> int | None:
        value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
        return int(value) if isinstance(value, (int, float)) and value > 0 else None

    pixels = read("max_pixels") or getattr(image_processor, "max_pixels", None)
    if hasattr(image_processor, "merge_size"):  # Qwen's smart_resize: longest_edge is pixels
        return DecodeBound(pixels=pixels or read("longest_edge"))
    if pixels:
        return DecodeBound(pixels=int(pixels))
    return DecodeBound(longest_edge=read("longest_edge"), shortest_edge=read("shortest_edge"))


def open_image(
    value: Any, image_root: str | None = None, bound: DecodeBound | None = None
) -> Image.Image:
    """Decode one image value (PIL, ``{"bytes", "path"}`` dict, or path) into upright 8-bit RGB.

    The EXIF orientation is applied, transparent pixels (RGBA, LA, a palette or colour key with
    transparency) are composited onto white, and the image is shrunk as ``bound`` allows
    (:class:`DecodeBound`). URLs are not fetched.

    Raises:
        ImageError: The value is empty (reason ``no image``), a URL (:data:`IMAGE_URL`), the
            file is missing (``image file missing``), or it cannot be read or decoded
            (``unreadable image``).
    """
    if isinstance(value, Image.Image):
        return _decoded(value, bound)
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
        url = _JOINED_URL.search(path)
        if url is not None:
            raise ImageError(f"{url.group(1)!r}: {IMAGE_URL}", IMAGE_URL, url.group(1))
        if image_root is not None and not os.path.isabs(path):
            path = os.path.join(image_root, path)
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except OSError as error:
            reason = IMAGE_MISSING if isinstance(error, FileNotFoundError) else IMAGE_UNREADABLE
            raise ImageError(f"unreadable image file {path!r}: {error}", reason, path) from error
    try:
        return _decoded(Image.open(io.BytesIO(data)), bound)
    except Exception as error:  # PIL raises several types for bad data
        where = f" {path!r}" if path else ""
        raise ImageError(
            f"undecodable image{where} ({type(error).__name__}: {error})",
            IMAGE_UNREADABLE,
            path or None,
        ) from error


def _decoded(image: Image.Image, bound: DecodeBound | None) -> Image.Image:
    """Load ``image`` (a JPEG at a reduced scale when ``bound`` allows), upright, in RGB, then
    reduced by what the JPEG decoder did not reduce."""
    width, height = image.size
    factor = bound.factor(width, height) if bound is not None else 1
    if factor > 1:
        image.draft(None, (width // factor, height // factor))  # JPEG only; others: a no-op
    image.load()
    drafted = width // image.width if image.width else 1
    if image.size != (width // drafted, height // drafted) or factor % drafted:
        drafted = factor  # an unexpected draft size: leave it as it is
    image = to_rgb(upright(image))
    return image.reduce(factor // drafted) if factor // drafted > 1 else image


def upright(image: Image.Image) -> Image.Image:
    """``image`` turned as its EXIF orientation says (a phone's JPEG is stored sideways)."""
    if image.getexif().get(_EXIF_ORIENTATION, 1) in (2, 3, 4, 5, 6, 7, 8):
        turned = ImageOps.exif_transpose(image)
        assert turned is not None  # not in place
        return turned
    return image


def has_alpha(image: Image.Image) -> bool:
    """Whether ``image`` has transparent pixels to composite: an alpha band, a palette with
    alpha, or a transparency index or colour key (``info["transparency"]``)."""
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        return True
    return image.mode == "P" and image.palette is not None and image.palette.mode == "RGBA"


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB. Transparent pixels are composited onto white, as transformers'
    ``convert_to_rgb`` does: Pillow's own conversion drops alpha, which turns the transparent
    background of a black-on-transparent diagram black. High-bit-depth greyscale (16-bit PNGs
    open as mode ``I;16`` or ``I``, float TIFFs as ``F``) is scaled by its range: Pillow's own
    conversion clips it to 0..255, which turns a 16-bit image almost white."""
    high_bit_depth = image.mode in ("I", "F") or image.mode.startswith("I;16")
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if not high_bit_depth and has_alpha(image):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if not high_bit_depth:
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


def sized_images(
    values: list[Any],
    min_pixels: int | None,
    max_pixels: int | None,
    bound: DecodeBound | None = None,
) -> list[Image.Image]:
    """Decode images (:func:`open_image`) and resize each into ``[min_pixels, max_pixels]``
    (:func:`fit_pixels`): what training rows and evaluation sets both show the processor."""
    return [fit_pixels(open_image(v, bound=bound), min_pixels, max_pixels) for v in values]


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
        fingerprint = Hasher.hash((dataset._fingerprint, "cppo-row-check-v3", settings))

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
    row: dict[str, Any],
    image_column: str,
    min_pixels: int | None,
    max_pixels: int | None,
    bound: DecodeBound | None = None,
) -> list[Image.Image]:
    """Decode and size the images of one row (raises ValueError for a bad or missing image).
    Relative paths were made absolute when the dataset was loaded (``DatasetSpec``)."""
    values = image_values(row[image_column])
    if not values:
        raise ImageError(NO_IMAGE, NO_IMAGE)
    return sized_images(values, min_pixels, max_pixels, bound)


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
