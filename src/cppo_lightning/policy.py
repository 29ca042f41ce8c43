"""Loading a policy and its processor, and the teacher-forced forward that scores responses.

Everything here goes through ``from_pretrained``: the embedded tiny model and a user's
Qwen2.5-VL-7B take the same path. ``builtin:NAME`` names a model shipped in
``cppo_lightning/assets/``.
"""

from __future__ import annotations

import dataclasses
import json
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForImageTextToText,
    PreTrainedModel,
    ProcessorMixin,
    Qwen2_5_VLProcessor,
    Qwen2VLProcessor,
)

from cppo_lightning.records import PromptBatch

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
)


class Qwen2_5_VLImageProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL processor for images only: the stock one demands a video processor, which
    needs torchvision (not a dependency of this project)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):  # type: ignore[no-untyped-def]
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class Qwen2VLImageProcessor(Qwen2VLProcessor):
    """Qwen2-VL processor for images only (see :class:`Qwen2_5_VLImageProcessor`)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):  # type: ignore[no-untyped-def]
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


_IMAGE_ONLY_PROCESSORS: dict[str, type[ProcessorMixin]] = {
    "qwen2_5_vl": Qwen2_5_VLImageProcessor,
    "qwen2_vl": Qwen2VLImageProcessor,
}


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


def _model_type(path: str) -> str | None:
    config = Path(path) / "config.json"
    if config.is_file():
        return json.loads(config.read_text()).get("model_type")
    return None


def load_processor(name_or_path: str) -> ProcessorMixin:
    """Load the multimodal processor of a checkpoint (tokenizer + image processor).

    Qwen-VL processors are rebuilt image-only, so that no video processor (torchvision) is needed.
    """
    path = resolve_model_path(name_or_path)
    model_type = _model_type(path)
    if model_type in _IMAGE_ONLY_PROCESSORS:
        processor = _IMAGE_ONLY_PROCESSORS[model_type].from_pretrained(path)
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
    name_or_path: str, dtype: str = "float32", attn_implementation: str | None = None
) -> PreTrainedModel:
    """Load a vision-language model for training, through ``AutoModelForImageTextToText``."""
    if not hasattr(torch, dtype) or not isinstance(getattr(torch, dtype), torch.dtype):
        raise ValueError(f"dtype {dtype!r} is not a torch dtype: use float32, bfloat16 or float16.")
    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype)}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForImageTextToText.from_pretrained(resolve_model_path(name_or_path), **kwargs)
    model.config.use_cache = False  # training forwards; generate turns the cache on itself
    return model


def suppressed_token_ids(processor: ProcessorMixin) -> list[int]:
    """Ids of the vision special tokens of this tokenizer, to suppress in every ``generate``."""
    tokenizer = processor.tokenizer  # type: ignore[attr-defined]
    vocab = tokenizer.get_vocab()
    return sorted({vocab[t] for t in VISION_TOKENS if t in vocab})


def select_images(
    pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick images ``index`` (with repeats) out of a processor's flattened patch tensor.

    Shape:
        pixel_values: ``[sum_b t_b*h_b*w_b, D]``; image_grid_thw: ``[B, 3]``; index: ``[n]``.
        Returns ``[sum over index of patches, D]`` and ``[n, 3]``.
    """
    counts = image_grid_thw.prod(dim=-1)  # [B] patches per image
    starts = torch.cumsum(counts, 0) - counts
    pieces = [pixel_values[starts[i] : starts[i] + counts[i]] for i in index.tolist()]
    return torch.cat(pieces, dim=0), image_grid_thw[index]


def response_logits(
    model: torch.nn.Module,
    prompts: PromptBatch,
    prompt_index: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
) -> torch.Tensor:
    """Teacher-forced logits that predict each response token.

    Args:
        model: The policy (or reference).
        prompts: The B prompts of the rollout batch.
        prompt_index: ``[n]`` the prompt of each of the n responses scored here.
        response_ids: ``[n, L]`` response tokens.
        response_mask: ``[n, L]``.
        pixel_values: Replacement patches for the B images (another view of the same images,
            same grid); the prompts' own when None.

    Returns:
        ``[n, L, V]`` logits; position j predicts ``response_ids[:, j]``.
    """
    pixels, grid = select_images(
        prompts.pixel_values if pixel_values is None else pixel_values,
        prompts.image_grid_thw,
        prompt_index,
    )
    length = response_ids.shape[1]
    inputs: dict[str, Any] = {
        "input_ids": torch.cat([prompts.input_ids[prompt_index], response_ids], dim=1),
        "attention_mask": torch.cat(
            [prompts.attention_mask[prompt_index], response_mask.to(prompts.attention_mask.dtype)],
            dim=1,
        ),
        "pixel_values": pixels,
        "image_grid_thw": grid,
        # Only the last L + 1 positions predict response tokens: skip the rest of the LM head.
        "logits_to_keep": length + 1,
        "use_cache": False,
    }
    if prompts.mm_token_type_ids is not None:
        # Without it Qwen-VL's M-RoPE positions are silently wrong over prompt + response.
        inputs["mm_token_type_ids"] = torch.cat(
            [prompts.mm_token_type_ids[prompt_index], torch.zeros_like(response_ids)], dim=1
        )
    logits = model(**inputs).logits  # [n, L + 1, V]
    return logits[:, :-1]  # [n, L, V]


def token_logps(
    logits: torch.Tensor, token_ids: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Log-probability of ``token_ids`` under ``softmax(logits / temperature)``.

    Uses ``gather - logsumexp`` so that no full-vocabulary log-softmax is materialised.

    Shape:
        logits: ``[n, L, V]``; token_ids: ``[n, L]``; returns ``[n, L]`` float32.
    """
    logits = logits.float() / temperature  # [n, L, V]
    picked = logits.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)  # [n, L]
    return picked - torch.logsumexp(logits, dim=-1)  # [n, L]


@dataclasses.dataclass
class LoraSettings:
    """LoRA adapters through peft; the frozen reference is then the base model with adapters off.

    Args:
        r: Rank of the adapters.
        alpha: Scaling numerator (the update is scaled by alpha / r).
        dropout: Dropout on the adapter input.
        target_modules: Module names to adapt (q_proj/v_proj reach the language model only).
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = dataclasses.field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
