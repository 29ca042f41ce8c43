"""Build tiny vision-language models offline: the embedded default and the models tests use.

The embedded default (``builtin:tiny-qwen2.5-vl``) is a real ``Qwen2_5_VLForConditionalGeneration``
with a byte-level BPE tokenizer trained on the synthetic task's text and a Qwen image processor.
It is built in two stages so that it looks at its image:

1. :func:`pretrain_vision` trains the vision tower and merger alone, through a throw-away linear
   :class:`RegionHead`, to predict each image token's region facts
   (:func:`cppo_lightning.data.synthetic.region_targets`). Without it the supervised phase
   collapses the image features of a randomly initialised tower to a near-constant (the question
   priors are the faster way down the loss) and the model answers the same for any image.
2. :func:`supervised_warm_start` trains the whole model on the reference solutions, with the
   region loss kept on as an auxiliary term, so that RL starts from a policy that is sometimes
   right and whose answers depend on the image.

``scripts/build_tiny_model.py`` rebuilds it from a seed and checks that it looks.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, cast

import datasets
import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from cppo_lightning.data.datamodule import PromptCollator
from cppo_lightning.data.synthetic import INSTRUCTION, corpus
from cppo_lightning.policy import Qwen2_5_VLImageProcessor, suppressed_token_ids
from cppo_lightning.rewards import exact_match_reward
from cppo_lightning.rollout import Sampling, decode_responses, generate_responses

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen's chat format, reduced to what single-image prompts need.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_tokenizer(texts: list[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (all 256 bytes in the alphabet) with Qwen's special tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_processor(tokenizer: PreTrainedTokenizerFast) -> Qwen2_5_VLImageProcessor:
    """Qwen image processor sized for 112 x 112 images (16 image tokens each)."""
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2
    )
    return Qwen2_5_VLImageProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE
    )


def tiny_config(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 128,
    num_layers: int = 4,
    vision_hidden_size: int = 64,
    vision_depth: int = 2,
) -> Qwen2_5_VLConfig:
    """A Qwen2.5-VL config small enough for CPU training (about 0.9M parameters by default)."""

    def ids(token: str) -> int:
        value = tokenizer.convert_tokens_to_ids(token)
        assert isinstance(value, int)
        return value

    head_dim = hidden_size // 4
    return Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden_size,
            "intermediate_size": 2 * hidden_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 1024,
            "bos_token_id": ids("<|endoftext|>"),
            "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": ids("<|endoftext|>"),
            # M-RoPE sections (temporal, height, width) must add up to head_dim / 2.
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [head_dim // 8, head_dim // 16 * 3, head_dim // 16 * 3],
            },
        },
        vision_config={
            "depth": vision_depth,
            "hidden_size": vision_hidden_size,
            "intermediate_size": 2 * vision_hidden_size,
            "num_heads": 2,
            "out_hidden_size": hidden_size,
            "fullatt_block_indexes": [vision_depth - 1],
            "window_size": 112,
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )


def build_random_tiny(
    seed: int = 0, **sizes: Any
) -> tuple[Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLImageProcessor]:
    """A randomly initialised tiny Qwen2.5-VL and its processor, deterministic in ``seed``."""
    tokenizer = train_tokenizer(corpus(n=500, seed=seed))
    processor = build_processor(tokenizer)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(tiny_config(tokenizer, **sizes))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, processor


class RegionHead(torch.nn.Linear):
    """Throw-away linear probe from each merged image token to its region targets."""

    def __init__(self, model: Any, num_targets: int) -> None:
        super().__init__(model.config.vision_config.out_hidden_size, num_targets)


def image_token_features(model: Any, vision: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[images * tokens, D]`` the merged image-token features the language model receives."""
    return model.model.visual(
        vision["pixel_values"], grid_thw=vision["image_grid_thw"]
    ).pooler_output


def region_loss(
    model: Any, head: RegionHead, vision: dict[str, torch.Tensor], targets: torch.Tensor
) -> torch.Tensor:
    """Binary cross-entropy of ``head`` on every image token against ``targets`` ``[B, T, C]``."""
    logits = head(image_token_features(model, vision))  # [B * T, C]
    return torch.nn.functional.binary_cross_entropy_with_logits(
        logits, targets.reshape(logits.shape)
    )


def _vision_inputs(processor: Any, images: Sequence[Any]) -> dict[str, torch.Tensor]:
    out = processor.image_processor(images=list(images), return_tensors="pt")
    return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}


def pretrain_vision(
    model: Any,
    processor: Any,
    images: Sequence[Any],
    targets: np.ndarray,
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
) -> tuple[RegionHead, list[float]]:
    """Trains the vision tower and merger (nothing else) to predict each token's region facts.

    Args:
        model: A Qwen2.5-VL model.
        processor: Its processor.
        images: Training images.
        targets: ``[len(images), tokens, C]`` region targets of each image.
        steps: Optimizer steps (AdamW, constant ``lr``).
        batch_size: Images per step.
        lr: Learning rate.
        seed: Seeds the head's initialisation and the batch order.

    Returns:
        The trained :class:`RegionHead` and the loss of every step.
    """
    if not 1 <= batch_size <= len(images) or len(targets) != len(images):
        raise ValueError(
            f"pretrain_vision needs 1 <= batch_size <= len(images) and one target per image, "
            f"got batch_size {batch_size}, {len(images)} images and {len(targets)} targets."
        )
    torch.manual_seed(seed)
    head = RegionHead(model, targets.shape[-1])
    params = [*model.model.visual.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    order = random.Random(seed)
    losses = []
    model.train()
    for _ in range(steps):
        index = order.sample(range(len(images)), batch_size)
        vision = _vision_inputs(processor, [images[i] for i in index])
        loss = region_loss(model, head, vision, torch.from_numpy(targets[index]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return head, losses


def supervised_warm_start(
    model: torch.nn.Module,
    processor: Any,
    dataset: datasets.Dataset,
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
    region_head: RegionHead | None = None,
    targets: np.ndarray | None = None,
    region_weight: float = 0.5,
) -> list[float]:
    """Teacher-forced training on the reference solutions (loss on response tokens only),
    AdamW with ``lr`` decayed linearly to 0 and gradients clipped at norm 1.

    With ``region_head`` and ``targets`` (``[len(dataset), tokens, C]``), ``region_weight`` times
    the region loss of :func:`pretrain_vision` is added, which keeps the image features apart.

    Returns the loss of every step (with the region term when it is on).
    """
    collate = PromptCollator(processor, INSTRUCTION)
    tokenizer = processor.tokenizer
    eos = tokenizer.eos_token
    params = list(model.parameters())
    if region_head is not None:
        if targets is None or len(targets) != len(dataset):
            raise ValueError("region_head needs targets for every row of the dataset.")
        params += list(region_head.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / steps)
    order = random.Random(seed)
    losses = []
    model.train()
    for _ in range(steps):
        index = order.sample(range(len(dataset)), batch_size)
        rows = [dataset[i] for i in index]
        prompts = collate(rows)
        solutions = tokenizer(
            [r["solution"] + eos for r in rows], padding=True, return_tensors="pt"
        )
        response_ids, response_mask = solutions["input_ids"], solutions["attention_mask"]
        inputs = {
            "input_ids": torch.cat([prompts.input_ids, response_ids], 1),
            "attention_mask": torch.cat([prompts.attention_mask, response_mask], 1),
            **prompts.vision,
            "mm_token_type_ids": torch.cat(
                [cast(torch.Tensor, prompts.mm_token_type_ids), torch.zeros_like(response_ids)], 1
            ),
        }
        labels = torch.full_like(inputs["input_ids"], -100)
        labels[:, prompts.input_ids.shape[1] :] = response_ids.masked_fill(response_mask == 0, -100)
        loss = model(**inputs, labels=labels).loss
        if region_head is not None:
            assert targets is not None
            aux = region_loss(model, region_head, prompts.vision, torch.from_numpy(targets[index]))
            loss = loss + region_weight * aux
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def heldout_accuracy(
    model: torch.nn.Module,
    processor: Any,
    dataset: datasets.Dataset,
    *,
    batch_size: int = 64,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    samples: int = 1,
) -> float:
    """Mean accuracy over ``dataset`` (greedy decoding unless a temperature is given; with
    ``samples > 1`` the mean over that many sampled responses per prompt, avg@k)."""
    collate = PromptCollator(processor, INSTRUCTION)
    model.eval()
    correct = 0.0
    for start in range(0, len(dataset), batch_size):
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        prompts = collate(rows)
        ids, mask = generate_responses(
            model,
            processor,
            prompts,
            Sampling(max_new_tokens, temperature),
            num_samples=samples,
            suppress_token_ids=suppressed_token_ids(processor),
        )
        texts = decode_responses(processor, ids, mask)
        answers = [r["answer"] for r in rows for _ in range(samples)]
        correct += sum(exact_match_reward(texts, answer=answers))
    return correct / (len(dataset) * samples)


def looking_problems(
    greedy: dict[str, dict[str, Any]], min_gap: float, accuracy_range: tuple[float, float]
) -> list[str]:
    """Why a built model does not pass as one that looks at its image (empty if it does).

    Args:
        greedy: Image condition (``original``, ``blank``, ``shuffled``) -> ``{"accuracy": ...}``,
            greedy held-out accuracy under that condition.
        min_gap: Least accuracy with the original images above each other condition.
        accuracy_range: Where the original images' accuracy must lie (room to learn, and reward
            variance inside GRPO groups).
    """
    original = greedy["original"]["accuracy"]
    problems = [
        f"greedy accuracy with {name} images is {result['accuracy']:.3f}, less than "
        f"{min_gap:.2f} below the original images' {original:.3f}"
        for name, result in greedy.items()
        if name != "original" and original - result["accuracy"] < min_gap
    ]
    low, high = accuracy_range
    if not low <= original <= high:
        problems.append(f"greedy accuracy {original:.3f} is outside [{low}, {high}]")
    return problems
