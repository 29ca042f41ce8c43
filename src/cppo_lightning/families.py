"""Supported model families: what differs between Qwen-VL, Idefics3/SmolVLM and LLaVA.

Everything else in the package is family-agnostic: it handles a prompt batch's image tensors as
an opaque dict (``PromptBatch.vision``) and asks this module how to pick the images of some
prompts out of it. A family is described by data, not code:

- which ``config.model_type`` values it covers and how its processor is loaded;
- the image tensors its processor returns and what their leading dimension counts
  (one row per prompt, per image, or per image patch);
- whether one prompt may hold several images;
- where its vision tower and projector live (for freezing them).

Adding a family is one :class:`Family` entry in :data:`FAMILIES` (see docs/extending.md).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import ProcessorMixin, Qwen2_5_VLProcessor, Qwen2VLProcessor, Qwen3VLProcessor

Layout = Literal["prompt", "image", "patch"]


class Qwen2_5_VLImageProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL processor for images only: the stock one demands a video processor, which
    needs torchvision (not a dependency of this project)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):  # type: ignore[no-untyped-def]
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class Qwen2VLImageProcessor(Qwen2VLProcessor):
    """Qwen2-VL processor for images only (see :class:`Qwen2_5_VLImageProcessor`)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):  # type: ignore[no-untyped-def]
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class Qwen3VLImageProcessor(Qwen3VLProcessor):
    """Qwen3-VL processor for images only (see :class:`Qwen2_5_VLImageProcessor`)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):  # type: ignore[no-untyped-def]
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


@dataclasses.dataclass(frozen=True)
class Family:
    """How one model family takes its images.

    Attributes:
        name: Short name used in errors and docs.
        model_types: ``config.model_type`` values of this family.
        processor_class: Processor to load with ``from_pretrained``; ``AutoProcessor`` when None.
        image_keys: Processor outputs that carry the images -> what their first dimension
            counts: ``prompt`` (one row per prompt, images padded inside), ``image`` (one row per
            image) or ``patch`` (flattened patches; rows per image from ``image_grid_thw``).
        multi_image: Whether one prompt may hold several images.
        nested_images: The processor wants images as one list per prompt (else a flat list).
        vision_tower: Attribute paths (from the ``...ForConditionalGeneration`` model) of the
            vision encoder, without the projector.
        projector: Attribute paths of the vision-to-text projector (merger / connector).
        processor_names: Processor class names of this family (to find a processor's family).
    """

    name: str
    model_types: tuple[str, ...]
    processor_class: type[ProcessorMixin] | None
    image_keys: Mapping[str, Layout]
    multi_image: bool
    nested_images: bool
    vision_tower: tuple[str, ...]
    projector: tuple[str, ...]
    processor_names: tuple[str, ...] = ()


def _qwen(
    name: str,
    model_type: str,
    processor_class: type[ProcessorMixin],
    vision_tower: tuple[str, ...] = ("model.visual.patch_embed", "model.visual.blocks"),
    projector: tuple[str, ...] = ("model.visual.merger",),
) -> Family:
    """A Qwen-VL family: flattened patches + patch grids, several images per prompt."""
    return Family(
        name=name,
        model_types=(model_type,),
        processor_class=processor_class,
        image_keys={"pixel_values": "patch", "image_grid_thw": "image"},
        multi_image=True,
        nested_images=False,
        vision_tower=vision_tower,
        projector=projector,
        processor_names=(processor_class.__mro__[1].__name__,),
    )


FAMILIES: tuple[Family, ...] = (
    _qwen("Qwen2-VL", "qwen2_vl", Qwen2VLImageProcessor),
    _qwen("Qwen2.5-VL", "qwen2_5_vl", Qwen2_5_VLImageProcessor),
    _qwen(
        "Qwen3-VL",
        "qwen3_vl",
        Qwen3VLImageProcessor,
        vision_tower=("model.visual.patch_embed", "model.visual.pos_embed", "model.visual.blocks"),
        projector=("model.visual.merger", "model.visual.deepstack_merger_list"),
    ),
    Family(
        name="Idefics3/SmolVLM",
        model_types=("idefics3",),  # SmolVLM (v1) checkpoints are idefics3 models
        processor_class=None,
        image_keys={"pixel_values": "prompt", "pixel_attention_mask": "prompt"},
        multi_image=True,
        nested_images=True,
        vision_tower=("model.vision_model",),
        projector=("model.connector",),
        processor_names=("Idefics3Processor",),
    ),
    Family(
        name="LLaVA",
        model_types=("llava",),
        processor_class=None,
        image_keys={"pixel_values": "image"},
        multi_image=False,
        nested_images=False,
        vision_tower=("model.vision_tower",),
        projector=("model.multi_modal_projector",),
        processor_names=("LlavaProcessor",),
    ),
)


def supported_model_types() -> list[str]:
    return sorted(t for family in FAMILIES for t in family.model_types)


def family_for(model_type: str | None, source: str = "the checkpoint") -> Family:
    """The family of a ``config.model_type``; a clear error for an unsupported one."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise ValueError(
        f"{source} is a {model_type!r} model, which cppo-lightning does not support. "
        f"Supported model types: {supported_model_types()} "
        f"({', '.join(f.name for f in FAMILIES)}). "
        "To add a family, add a Family entry to cppo_lightning/families.py "
        "(docs/extending.md, 'Adding a model family')."
    )


def family_of_processor(processor: Any) -> Family:
    """The family a processor belongs to (by its class or the classes it derives from)."""
    for cls in type(processor).__mro__:
        for family in FAMILIES:
            if cls.__name__ in family.processor_names:
                return family
    raise ValueError(
        f"{type(processor).__name__} is not the processor of a supported family "
        f"({', '.join(f.name for f in FAMILIES)})."
    )


def read_model_type(path: str) -> str | None:
    """``model_type`` of a local checkpoint or a hub name (from the cached or downloaded config)."""
    config = Path(path) / "config.json"
    if config.is_file():
        return json.loads(config.read_text()).get("model_type")
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path).model_type


def counts_per_prompt(
    vision: Mapping[str, torch.Tensor],
    layout: Mapping[str, Layout],
    image_counts: torch.Tensor,
) -> dict[Layout, torch.Tensor]:
    """Rows each prompt owns in a tensor of each layout: ``{layout: [B]}``."""
    counts: dict[Layout, torch.Tensor] = {
        "prompt": torch.ones_like(image_counts),
        "image": image_counts,
    }
    if "patch" in layout.values():
        grid = vision["image_grid_thw"]  # [num_images, 3]
        per_image = grid.prod(dim=-1)  # [num_images]
        owner = torch.repeat_interleave(
            torch.arange(len(image_counts), device=image_counts.device), image_counts
        )
        counts["patch"] = torch.zeros_like(image_counts).index_add_(0, owner, per_image)
    return counts


def select_vision(
    vision: Mapping[str, torch.Tensor],
    layout: Mapping[str, Layout],
    image_counts: torch.Tensor,
    index: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The image tensors of prompts ``index`` (repeats allowed), in the processor's layout.

    Args:
        vision: Processor outputs carrying the images of B prompts.
        layout: Key -> what the key's first dimension counts (``Family.image_keys``).
        image_counts: ``[B]`` images per prompt.
        index: ``[n]`` prompts to pick.
    """
    counts = counts_per_prompt(vision, layout, image_counts)
    selected: dict[str, torch.Tensor] = {}
    for key, tensor in vision.items():
        kind = layout[key]
        if kind == "prompt":
            selected[key] = tensor[index]
            continue
        rows = counts[kind]
        starts = torch.cumsum(rows, 0) - rows
        pieces = [tensor[starts[i] : starts[i] + rows[i]] for i in index.tolist()]
        selected[key] = torch.cat(pieces, dim=0)
    return selected


def encode_images(
    image_processor: Any,
    images: Sequence[torch.Tensor],
    image_counts: Sequence[int],
    family: Family,
) -> dict[str, torch.Tensor]:
    """Run the image processor on float images ``[3, H, W]`` in [0, 1] (e.g. kornia views)
    the way the collator ran the processor on the originals; returns the image tensors."""
    # PIL-based processors refuse values outside [0, 1] (kornia's noise does not clamp).
    host = [image.detach().float().clamp(0, 1).cpu() for image in images]
    batch: Any = host
    if family.nested_images:
        batch, start = [], 0
        for count in image_counts:
            batch.append(host[start : start + count])
            start += count
    encoded = image_processor(images=batch, do_rescale=False, return_tensors="pt")
    return {key: encoded[key] for key in family.image_keys}


def resolve_modules(model: torch.nn.Module, paths: Sequence[str]) -> list[torch.nn.Module]:
    """The submodules at ``paths`` (attribute paths such as ``model.visual.merger``).

    Paths that do not exist in this model are skipped (e.g. Qwen3-VL's deepstack mergers in a
    model built without them); an error is raised only if none exists.
    """
    found = []
    for path in paths:
        module: Any = model
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, torch.nn.Module):
            found.append(module)
    if not found:
        raise ValueError(
            f"{type(model).__name__} has none of the modules {list(paths)}: the family table in "
            "cppo_lightning/families.py does not match this transformers version's model."
        )
    return found
