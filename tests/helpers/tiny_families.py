"""Tiny randomly initialised vision-language models of several families, built offline.

``build_tiny_family(family, directory, seed)`` writes a checkpoint that loads like a real one:
``config.json`` + weights from ``save_pretrained`` of the model, and the processor files (tokenizer,
image processor, chat template) from ``save_pretrained`` of the processor. Everything is built from
configs, with no hub access, deterministically from ``seed``, in well under a second:

* ``qwen2_vl`` / ``qwen2_5_vl`` / ``qwen3_vl``: Qwen-VL models with Qwen's chat format
  (``<|vision_start|><|image_pad|><|vision_end|>``) and a PIL Qwen image processor.
* ``idefics3``: ``Idefics3ForConditionalGeneration`` (the SmolVLM architecture) with SmolVLM's chat
  format (``User:<image>...<end_of_utterance>``) and an ``Idefics3Processor``.
* ``llava``: ``LlavaForConditionalGeneration`` (tiny CLIP vision tower + tiny Llama) with
  LLaVA-1.5's chat format (``USER: <image>\\n... ASSISTANT:``).

Each tokenizer is a byte-level BPE trained in code on a small corpus (English, digits, LaTeX such as
``\\boxed{}``, ``<think></think>``), with the family's special tokens. Image processors are sized so
that a 112 x 112 image gives 16 image tokens, a 96 x 128 one 12 to 16 (Idefics3 with image
splitting: 80 for either).

The saved processor files name the stock processor class (``Qwen2_5_VLProcessor``, ...), as a real
checkpoint's do. ``AutoProcessor.from_pretrained`` then works for Idefics3 and LLaVA; the stock Qwen
processors demand a video processor (torchvision): ``cppo_lightning.policy.load_processor`` loads
them with the image-only subclasses of ``cppo_lightning.families``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPImageProcessorPil,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

from cppo_lightning.families import (
    Qwen2_5_VLImageProcessor,
    Qwen2VLImageProcessor,
    Qwen3VLImageProcessor,
)
from cppo_lightning.tiny import SPECIAL_TOKENS

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "idefics3", "llava")

TEXT_HIDDEN = 64
TEXT_LAYERS = 2
VISION_HIDDEN = 32
VISION_DEPTH = 2
VOCAB_SIZE = 512


# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------

QWEN_SPECIAL_TOKENS = SPECIAL_TOKENS  # the embedded model's, from cppo_lightning.tiny
IDEFICS3_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<fake_token_around_image>",
    "<image>",
    "<end_of_utterance>",
    "<global-img>",
    *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)),
)
LLAVA_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<image>", "<pad>")

# Qwen2-VL / Qwen2.5-VL format (with their default system prompt), without video.
QWEN2_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen3-VL Instruct format (no default system prompt), without tools and video.
QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# SmolVLM (Idefics3) format.
IDEFICS3_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}: {{ message['content'] }}"
    "{% else %}{% if message['content'][0]['type'] == 'image' %}:{% else %}: {% endif %}"
    "{% for line in message['content'] %}"
    "{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}<image>{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

# LLaVA-1.5 (llava-hf) format: images first, then text; the tokenizer adds <s>.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def training_corpus(n: int = 400) -> list[str]:
    """A fixed small corpus: English about images, arithmetic, LaTeX and reasoning tags."""
    rng = random.Random(1234)
    colours = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple"]
    shapes = ["circle", "square", "triangle", "star", "line", "dot"]
    chat = [
        "You are a helpful assistant.",
        "system user assistant User: Assistant: USER: ASSISTANT:",
        "Picture 1: Picture 2: What is in the image? Describe the picture.",
        "The answer is \\boxed{42}. So the final answer is $\\frac{1}{2}$ and $x^2 + y^2$.",
        "<think>\nLet me count the shapes.\n</think>\n",
    ]
    texts = list(chat)
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        count = rng.randint(1, 9)
        colour, shape = rng.choice(colours), rng.choice(shapes)
        texts.append(
            f"How many {colour} {shape}s are in the image? "
            f"<think>I see {count} {colour} {shape}s. {a} + {b} = {a + b}.</think> "
            f"The answer is \\boxed{{{count}}}. What is {a} times {b}? $\\boxed{{{a * b}}}$"
        )
    return texts


def train_tokenizer(
    special_tokens: tuple[str, ...],
    chat_template: str,
    *,
    eos: str,
    pad: str,
    bos: str | None = None,
    unk: str | None = None,
    add_bos: bool = False,
    vocab_size: int = VOCAB_SIZE,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE (all 256 bytes in the alphabet, ``special_tokens`` first) with a chat
    template; ``add_bos`` prepends ``bos`` to every encoding, as Llama tokenizers do."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_corpus(), trainer)
    if add_bos:
        assert bos is not None
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, tokenizer.token_to_id(bos))],
        )
    tokens: dict[str, Any] = {"eos_token": eos, "pad_token": pad}
    if bos is not None:
        tokens["bos_token"] = bos
    if unk is not None:
        tokens["unk_token"] = unk
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **tokens)
    fast.chat_template = chat_template
    return fast


def _token_id(tokenizer: PreTrainedTokenizerFast, token: str) -> int:
    value = tokenizer.convert_tokens_to_ids(token)
    assert isinstance(value, int) and value != tokenizer.unk_token_id, token
    return value


def _special_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    ids = {"eos_token_id": _token_id(tokenizer, tokenizer.eos_token)}
    ids["pad_token_id"] = _token_id(tokenizer, tokenizer.pad_token)
    if tokenizer.bos_token is not None:
        ids["bos_token_id"] = _token_id(tokenizer, tokenizer.bos_token)
    return ids


def _llama_text_config(tokenizer: PreTrainedTokenizerFast) -> dict[str, Any]:
    return {
        "model_type": "llama",
        "vocab_size": len(tokenizer),
        "hidden_size": TEXT_HIDDEN,
        "intermediate_size": 2 * TEXT_HIDDEN,
        "num_hidden_layers": TEXT_LAYERS,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        **_special_ids(tokenizer),
    }


# ---------------------------------------------------------------------------------------------
# Families: each returns (model, processor, stock processor class name)
# ---------------------------------------------------------------------------------------------

Built = tuple[PreTrainedModel, ProcessorMixin, str]


def _qwen_text_config(
    tokenizer: PreTrainedTokenizerFast, mrope_section: list[int], **rope: Any
) -> dict[str, Any]:
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": TEXT_HIDDEN,
        "intermediate_size": 2 * TEXT_HIDDEN,
        "num_hidden_layers": TEXT_LAYERS,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        **_special_ids(tokenizer),
        "bos_token_id": _token_id(tokenizer, "<|endoftext|>"),  # as in Qwen's configs
        # M-RoPE sections (temporal, height, width) add up to head_dim / 2 = 8.
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": mrope_section,
            **rope,
        },
    }


def _qwen_token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, Any]:
    return {
        "image_token_id": _token_id(tokenizer, "<|image_pad|>"),
        "video_token_id": _token_id(tokenizer, "<|video_pad|>"),
        "vision_start_token_id": _token_id(tokenizer, "<|vision_start|>"),
        "vision_end_token_id": _token_id(tokenizer, "<|vision_end|>"),
    }


def _qwen_tokenizer(chat_template: str) -> PreTrainedTokenizerFast:
    return train_tokenizer(
        QWEN_SPECIAL_TOKENS, chat_template, eos="<|im_end|>", pad="<|endoftext|>"
    )


def _qwen2_image_processor() -> Qwen2VLImageProcessorPil:
    # 14-pixel patches merged 2 x 2: 112 x 112 -> 8 x 8 patches -> 16 tokens.
    return Qwen2VLImageProcessorPil(
        min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2
    )


def _build_qwen2_vl() -> Built:
    tokenizer = _qwen_tokenizer(QWEN2_CHAT_TEMPLATE)
    processor = Qwen2VLImageProcessor(
        _qwen2_image_processor(), tokenizer, chat_template=QWEN2_CHAT_TEMPLATE
    )
    config = Qwen2VLConfig(
        text_config=_qwen_text_config(tokenizer, [2, 3, 3]),
        vision_config={
            "depth": VISION_DEPTH,
            "embed_dim": VISION_HIDDEN,
            "hidden_size": TEXT_HIDDEN,  # the merger's output width
            "mlp_ratio": 2,
            "num_heads": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
        },
        **_qwen_token_ids(tokenizer),
        tie_word_embeddings=True,
    )
    return Qwen2VLForConditionalGeneration(config), processor, "Qwen2VLProcessor"


def _build_qwen2_5_vl() -> Built:
    tokenizer = _qwen_tokenizer(QWEN2_CHAT_TEMPLATE)
    processor = Qwen2_5_VLImageProcessor(
        _qwen2_image_processor(), tokenizer, chat_template=QWEN2_CHAT_TEMPLATE
    )
    config = Qwen2_5_VLConfig(
        text_config=_qwen_text_config(tokenizer, [2, 3, 3]),
        vision_config={
            "depth": VISION_DEPTH,
            "hidden_size": VISION_HIDDEN,
            "intermediate_size": 2 * VISION_HIDDEN,
            "num_heads": 2,
            "out_hidden_size": TEXT_HIDDEN,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "fullatt_block_indexes": [VISION_DEPTH - 1],
            "window_size": 112,
        },
        **_qwen_token_ids(tokenizer),
        tie_word_embeddings=True,
    )
    return Qwen2_5_VLForConditionalGeneration(config), processor, "Qwen2_5_VLProcessor"


def _build_qwen3_vl() -> Built:
    tokenizer = _qwen_tokenizer(QWEN3_CHAT_TEMPLATE)
    # Qwen3-VL: 16-pixel patches merged 2 x 2, mean/std 0.5: 112 x 112 -> 128 x 128 -> 16 tokens.
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=64 * 64,
        max_pixels=128 * 128,
        patch_size=16,
        merge_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = Qwen3VLImageProcessor(image_processor, tokenizer, chat_template=QWEN3_CHAT_TEMPLATE)
    config = Qwen3VLConfig(
        text_config=_qwen_text_config(tokenizer, [4, 2, 2], mrope_interleaved=True)
        | {"head_dim": TEXT_HIDDEN // 4},
        vision_config={
            "depth": VISION_DEPTH,
            "hidden_size": VISION_HIDDEN,
            "intermediate_size": 2 * VISION_HIDDEN,
            "num_heads": 2,
            "out_hidden_size": TEXT_HIDDEN,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "num_position_embeddings": 64,  # an 8 x 8 grid of learned positions, interpolated
            "deepstack_visual_indexes": [0],
        },
        **_qwen_token_ids(tokenizer),
        tie_word_embeddings=True,
    )
    return Qwen3VLForConditionalGeneration(config), processor, "Qwen3VLProcessor"


def _build_idefics3(image_splitting: bool = False) -> Built:
    tokenizer = train_tokenizer(
        IDEFICS3_SPECIAL_TOKENS,
        IDEFICS3_CHAT_TEMPLATE,
        eos="<end_of_utterance>",
        pad="<|im_end|>",
        bos="<|im_start|>",
        unk="<|endoftext|>",
    )
    # 64 x 64 frames of 8-pixel patches, pixel-shuffled 2 x 2: 16 <image> tokens a frame. With
    # splitting, the longest edge goes to 128: 2 x 2 tiles + the global image (80 tokens).
    image_size, patch_size, scale_factor = 64, 8, 2
    image_seq_len = (image_size // patch_size) ** 2 // scale_factor**2
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": 2 * image_size},
        max_image_size={"longest_edge": image_size},
        do_image_splitting=image_splitting,
    )
    processor = Idefics3Processor(
        image_processor,
        tokenizer,
        image_seq_len=image_seq_len,
        chat_template=IDEFICS3_CHAT_TEMPLATE,
    )
    config = Idefics3Config(
        text_config=_llama_text_config(tokenizer),
        vision_config={
            "hidden_size": VISION_HIDDEN,
            "intermediate_size": 2 * VISION_HIDDEN,
            "num_hidden_layers": VISION_DEPTH,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": patch_size,
        },
        scale_factor=scale_factor,
        image_token_id=_token_id(tokenizer, "<image>"),
        # A deprecated top-level field, read from **kwargs; its default (128002) is out of vocab.
        pad_token_id=_token_id(tokenizer, "<|im_end|>"),  # type: ignore[call-arg]
        tie_word_embeddings=False,
    )
    return Idefics3ForConditionalGeneration(config), processor, "Idefics3Processor"


def _build_llava() -> Built:
    tokenizer = train_tokenizer(
        LLAVA_SPECIAL_TOKENS,
        LLAVA_CHAT_TEMPLATE,
        eos="</s>",
        pad="<pad>",
        bos="<s>",
        unk="<unk>",
        add_bos=True,
    )
    # 56 x 56 crops of 14-pixel patches: 16 patches (+ CLS, dropped by the "default" strategy).
    image_size, patch_size = 56, 14
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor,
        tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        chat_template=LLAVA_CHAT_TEMPLATE,
        image_token="<image>",
        num_additional_image_tokens=1,
    )
    config = LlavaConfig(
        text_config=_llama_text_config(tokenizer),
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": VISION_HIDDEN,
            "intermediate_size": 2 * VISION_HIDDEN,
            "projection_dim": VISION_HIDDEN,
            "num_hidden_layers": VISION_DEPTH,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": patch_size,
        },
        image_token_index=_token_id(tokenizer, "<image>"),
        image_seq_length=(image_size // patch_size) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    return LlavaForConditionalGeneration(config), processor, "LlavaProcessor"


_BUILDERS: dict[str, Callable[[], Built]] = {
    "qwen2_vl": _build_qwen2_vl,
    "qwen2_5_vl": _build_qwen2_5_vl,
    "qwen3_vl": _build_qwen3_vl,
    "idefics3": _build_idefics3,
    "llava": _build_llava,
}


def _name_stock_processor(directory: Path, class_name: str) -> None:
    """Make the saved files name the stock processor class, as a real checkpoint's do."""
    for path in directory.glob("*.json"):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and data.get("processor_class", class_name) != class_name:
            data["processor_class"] = class_name
            path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def build_tiny_family(
    family: str, directory: Path, seed: int = 0, *, image_splitting: bool = False
) -> Path:
    """Write a tiny randomly initialised model of ``family`` and its processor to ``directory``.

    Args:
        family: One of :data:`FAMILIES`.
        directory: Where to save (created if missing).
        seed: Seeds the weights (the tokenizer is the same for every seed).
        image_splitting: Idefics3 only: save the image processor with ``do_image_splitting`` on
            (80 image tokens for a 112 x 112 image instead of 16).

    Returns:
        ``directory``, loadable with ``AutoModelForImageTextToText.from_pretrained`` and the
        image-only processor subclass (``AutoProcessor`` for Idefics3/LLaVA).
    """
    if family not in _BUILDERS:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family == "idefics3":
            model, processor, stock_class = _build_idefics3(image_splitting)
        else:
            model, processor, stock_class = _BUILDERS[family]()
    tokenizer = processor.tokenizer  # type: ignore[attr-defined]
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    _name_stock_processor(directory, stock_class)
    return directory
