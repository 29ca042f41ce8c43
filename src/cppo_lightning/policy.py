"""Loading a policy and its processor, and the teacher-forced forward that scores responses.

Everything here goes through ``from_pretrained``: the embedded tiny model and a user's
Qwen2.5-VL-7B take the same path. ``builtin:NAME`` names a model shipped in
``cppo_lightning/assets/``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForImageTextToText, PreTrainedModel, ProcessorMixin

from cppo_lightning.families import (
    Family,
    Qwen2_5_VLImageProcessor,
    Qwen2VLImageProcessor,
    Qwen3VLImageProcessor,
    family_for,
    read_model_type,
    resolve_modules,
)
from cppo_lightning.logprobs import lm_head, response_hidden
from cppo_lightning.records import PromptBatch

__all__ = [
    "Qwen2VLImageProcessor",
    "Qwen2_5_VLImageProcessor",
    "Qwen3VLImageProcessor",
    "apply_lora",
    "load_policy",
    "load_processor",
    "model_family",
    "response_logits",
    "save_processor",
    "token_logps",
]

BUILTIN_PREFIX = "builtin:"
DEFAULT_MODEL = "builtin:tiny-qwen2.5-vl"

# Special tokens a policy must never sample: an image placeholder in a response breaks the next
# forward ("Image features and image tokens do not match").
VISION_TOKENS = (
    "<|image_pad|>",
    "<|video_pad|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<image>",
    "<video>",
    "<fake_token_around_image>",  # Idefics3/SmolVLM image framing
    "<global-img>",
)
# Idefics3's tile markers <row_i_col_j>.
_TILE_TOKEN = re.compile(r"<row_\d+_col_\d+>")


def resolve_model_path(name_or_path: str) -> str:
    """Turn ``builtin:NAME`` into the path of the packaged model; return anything else as is."""
    if not name_or_path.startswith(BUILTIN_PREFIX):
        return name_or_path
    name = name_or_path[len(BUILTIN_PREFIX) :]
    path = Path(str(resources.files("cppo_lightning") / "assets" / name))
    if not (path / "config.json").is_file():
        available = sorted(
            p.name
            for p in Path(str(resources.files("cppo_lightning") / "assets")).iterdir()
            if (p / "config.json").is_file()
        )
        raise FileNotFoundError(
            f"no built-in model {name!r} in {path.parent}; available: {available}. "
            "Rebuild the embedded model with `python scripts/build_tiny_model.py`."
        )
    return str(path)


def model_family(name_or_path: str) -> Family:
    """The :class:`~cppo_lightning.families.Family` of a checkpoint; a clear error for a model
    type this package does not support."""
    path = resolve_model_path(name_or_path)
    return family_for(read_model_type(path), source=repr(name_or_path))


def load_processor(name_or_path: str) -> ProcessorMixin:
    """Load the multimodal processor of a checkpoint (tokenizer + image processor).

    Qwen-VL processors are rebuilt image-only, so that no video processor (torchvision) is needed.
    """
    path = resolve_model_path(name_or_path)
    family = model_family(name_or_path)
    if family.processor_class is not None:
        processor = family.processor_class.from_pretrained(path)
    else:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(path)
    if (
        not isinstance(processor, ProcessorMixin)
        or getattr(processor, "image_processor", None) is None
    ):
        raise ValueError(
            f"{name_or_path!r} has no multimodal processor (got {type(processor).__name__}): "
            "point model_name_or_path at a vision-language checkpoint with processor files."
        )
    tokenizer = processor.tokenizer  # type: ignore[attr-defined]
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return processor


def load_policy(
    name_or_path: str,
    dtype: str = "float32",
    attn_implementation: str | None = None,
    *,
    freeze_vision_tower: bool = False,
    freeze_projector: bool = False,
    activation_checkpointing: bool = False,
) -> PreTrainedModel:
    """Load a vision-language model for training, through ``AutoModelForImageTextToText``.

    Args:
        name_or_path: Hub name, local path or ``builtin:NAME``.
        dtype: Weight dtype (float32, bfloat16, float16).
        attn_implementation: ``sdpa``, ``eager``, ``flash_attention_2``...; the model's default
            when None.
        freeze_vision_tower: Keep the vision encoder's weights fixed (requires_grad off).
        freeze_projector: Keep the vision-to-text projector's weights fixed.
        activation_checkpointing: Recompute activations in the backward pass (less memory,
            about a third more compute).
    """
    if not hasattr(torch, dtype) or not isinstance(getattr(torch, dtype), torch.dtype):
        raise ValueError(f"dtype {dtype!r} is not a torch dtype: use float32, bfloat16 or float16.")
    family = model_family(name_or_path)  # an unsupported family fails here, before any download
    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype)}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForImageTextToText.from_pretrained(resolve_model_path(name_or_path), **kwargs)
    model.config.use_cache = False  # training forwards; generate turns the cache on itself
    frozen = (family.vision_tower if freeze_vision_tower else ()) + (
        family.projector if freeze_projector else ()
    )
    if frozen:
        for module in resolve_modules(model, frozen):
            module.requires_grad_(False)
    if activation_checkpointing:
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    return model


# The video processor a stock Qwen-VL processor loads next to its image processor (through
# torchvision): named in an export so that `AutoProcessor` builds the stock processor.
STOCK_VIDEO_PROCESSORS = {
    "Qwen2VLProcessor": "Qwen2VLVideoProcessor",
    "Qwen2_5_VLProcessor": "Qwen2VLVideoProcessor",
    "Qwen3VLProcessor": "Qwen3VLVideoProcessor",
}
# Image-processor settings a Qwen-VL video processor shares (frame sizes and sampling keep the
# video processor's defaults).
_SHARED_VIDEO_SETTINGS = (
    "do_convert_rgb",
    "do_normalize",
    "do_rescale",
    "do_resize",
    "image_mean",
    "image_std",
    "merge_size",
    "patch_size",
    "resample",
    "rescale_factor",
    "temporal_patch_size",
)


def save_processor(processor: ProcessorMixin, directory: str) -> None:
    """``save_pretrained`` the processor under its transformers class name: the image-only
    subclasses of :mod:`cppo_lightning.families` are recorded as the stock class they derive
    from, with the stock video processor that class loads (its settings shared with the image
    processor), so ``AutoProcessor`` loads the files without this package, as it loads the
    original model's. Like the original's, that needs torchvision (for the video processor);
    without it, :func:`load_processor` loads the files image-only."""
    processor.save_pretrained(directory)
    stock = next(
        cls.__name__ for cls in type(processor).__mro__ if cls.__module__.startswith("transformers")
    )
    for path in Path(directory).glob("*.json"):
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            continue
        changed = data.get("processor_class") not in (None, stock)
        if changed:
            data["processor_class"] = stock
        image = data.get("image_processor")
        video = STOCK_VIDEO_PROCESSORS.get(stock)
        if (
            path.name == "processor_config.json"
            and isinstance(image, dict)
            and video is not None
            and "video_processor" not in data
        ):
            shared = {key: image[key] for key in _SHARED_VIDEO_SETTINGS if key in image}
            data["video_processor"] = {**shared, "video_processor_type": video}
            changed = True
        if changed:
            path.write_text(json.dumps(data, indent=2) + "\n")


def suppressed_token_ids(processor: ProcessorMixin) -> list[int]:
    """Ids of the vision special tokens of this tokenizer, to suppress in every ``generate``."""
    tokenizer = processor.tokenizer  # type: ignore[attr-defined]
    vocab = tokenizer.get_vocab()
    ids = {vocab[t] for t in VISION_TOKENS if t in vocab}
    ids |= {i for t, i in vocab.items() if _TILE_TOKEN.fullmatch(t)}
    return sorted(ids)


def response_logits(
    model: torch.nn.Module,
    prompts: PromptBatch,
    prompt_index: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    vision: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Teacher-forced logits that predict each response token, for analysis scripts.

    Training never calls this: it holds the full ``[n, L, V]`` logits, which the memory-bounded
    path of :mod:`cppo_lightning.logprobs` never materialises. Arguments as
    :func:`cppo_lightning.logprobs.response_hidden`.

    Returns:
        ``[n, L, V]`` logits; position j predicts ``response_ids[:, j]``.
    """
    hidden = response_hidden(model, prompts, prompt_index, response_ids, response_mask, vision)
    return lm_head(model)(hidden)  # [n, L, V]


def token_logps(
    logits: torch.Tensor, token_ids: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Log-probability of ``token_ids`` under ``softmax(logits / temperature)``, from full
    logits (tests and analysis; training uses :mod:`cppo_lightning.logprobs`).

    Shape:
        logits: ``[n, L, V]``; token_ids: ``[n, L]``; returns ``[n, L]`` in float32 (float64
        for float64 logits).
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    picked = logits.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)  # [n, L]
    return picked - torch.logsumexp(logits, dim=-1)  # [n, L]


@dataclasses.dataclass
class LoraSettings:
    """LoRA adapters through peft; the frozen reference is then the base model with adapters off.

    Adapters go on the language model only, unless ``adapt_vision`` asks for the vision side
    too: ``target_modules`` are matched by name, and some vision towers use the language model's
    names (Idefics3/SmolVLM's SigLIP and LLaVA's CLIP call their attention projections
    ``q_proj``/``k_proj``/``v_proj``; Qwen2.5-VL's vision MLP has ``gate_proj``/``up_proj``/
    ``down_proj``; Qwen2-VL's and Qwen3-VL's vision blocks use a fused ``qkv``, ``proj`` and
    ``fc1``/``fc2`` or ``linear_fc1``/``linear_fc2``).

    Args:
        r: Rank of the adapters.
        alpha: Scaling numerator (the update is scaled by alpha / r).
        dropout: Dropout on the adapter input.
        target_modules: Module names to adapt (a name matches a module whose attribute path
            ends with it, as in peft).
        adapt_vision: Also adapt the modules of the vision tower and the projector whose names
            match ``target_modules``. False (the default) keeps every adapter in the language
            model: the vision tower and projector then keep their pretrained weights.
            ``model.freeze_vision_tower`` / ``model.freeze_projector`` keep adapters out of
            those parts either way.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = dataclasses.field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    exclude_modules: list[str] | None = None
    """Module-name patterns (regular expressions) that get no adapter."""
    adapt_vision: bool = False


def apply_lora(
    model: PreTrainedModel, settings: LoraSettings, exclude: Sequence[str] = ()
) -> torch.nn.Module:
    """Wrap ``model`` with peft LoRA adapters; modules under the ``exclude`` attribute paths
    (e.g. a frozen vision tower) get none, and neither do the family's vision tower and
    projector unless ``settings.adapt_vision``. The base weights are frozen by peft."""
    from peft import LoraConfig, get_peft_model

    if not settings.adapt_vision:
        family = family_for(getattr(model.config, "model_type", None))
        exclude = (*exclude, *family.vision_tower, *family.projector)
    patterns = list(settings.exclude_modules or []) + [
        re.escape(path) + r"(\..*)?" for path in dict.fromkeys(exclude)
    ]
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        exclude_modules="|".join(f"(?:{p})" for p in patterns) if patterns else None,
    )
    return get_peft_model(model, config)
