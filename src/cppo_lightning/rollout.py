"""Sampling G responses per prompt with Hugging Face ``generate``, and scoring them."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from transformers import ProcessorMixin

from cppo_lightning.records import PromptBatch, RolloutBatch

Scorer = Callable[[Sequence[str], Mapping[str, Sequence[Any]]], tuple[torch.Tensor, dict]]


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How responses are sampled.

    Attributes:
        max_new_tokens: Longest response, in tokens.
        temperature: Sampling temperature; 0 decodes greedily.
        top_p: Nucleus sampling mass; 1.0 keeps the whole distribution.
        top_k: Top-k sampling; 0 keeps the whole vocabulary.
        batch_size: Most responses per ``generate`` call (whole prompts, so at least one
            prompt's G); all at once when None. Bounds the KV cache.
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    batch_size: int | None = None

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of HF ``generate`` for this sampling."""
        if self.temperature == 0:
            return {"do_sample": False, "max_new_tokens": self.max_new_tokens}
        return {
            "do_sample": True,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "max_new_tokens": self.max_new_tokens,
        }


def response_mask_from_ids(
    response_ids: torch.Tensor, eos_token_ids: Sequence[int]
) -> torch.Tensor:
    """1 up to and including the first end-of-sequence token of each row, 0 after it.

    Shape:
        response_ids: ``[N, L]``; returns ``[N, L]`` long.
    """
    is_eos = torch.isin(response_ids, torch.tensor(list(eos_token_ids), device=response_ids.device))
    # Number of eos tokens strictly before each position: 0 means the position is still valid.
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()  # [N, L]
    return (eos_before == 0).long()


@torch.no_grad()
def generate_responses(
    policy: torch.nn.Module,
    processor: ProcessorMixin,
    prompts: PromptBatch,
    sampling: Sampling,
    *,
    num_samples: int,
    suppress_token_ids: Sequence[int] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``num_samples`` responses for each prompt (greedy when the temperature is 0).

    Returns:
        ``(response_ids [B * num_samples, L], response_mask [B * num_samples, L])`` with the
        responses of one prompt contiguous.
    """
    tokenizer = processor.tokenizer  # type: ignore[attr-defined]
    per_call = max(1, (sampling.batch_size or 0) // num_samples) if sampling.batch_size else None
    if per_call is not None and per_call < prompts.num_prompts:
        index = torch.arange(prompts.num_prompts, device=prompts.input_ids.device)
        pieces = [
            generate_responses(
                policy,
                processor,
                prompts.subset(chunk),
                dataclasses.replace(sampling, batch_size=None),
                num_samples=num_samples,
                suppress_token_ids=suppress_token_ids,
            )
            for chunk in index.split(per_call)
        ]
        length = max(ids.shape[1] for ids, _ in pieces)
        pad = tokenizer.pad_token_id
        response_ids = torch.cat(
            [
                torch.nn.functional.pad(ids, (0, length - ids.shape[1]), value=pad)
                for ids, _ in pieces
            ]
        )
        response_mask = torch.cat(
            [torch.nn.functional.pad(m, (0, length - m.shape[1]), value=0) for _, m in pieces]
        )
        return response_ids, response_mask
    eos_ids = _eos_token_ids(policy, tokenizer)
    inputs: dict[str, Any] = {
        "input_ids": prompts.input_ids,
        "attention_mask": prompts.attention_mask,
        **prompts.vision,
    }
    if prompts.mm_token_type_ids is not None:
        inputs["mm_token_type_ids"] = prompts.mm_token_type_ids
    sequences = policy.generate(  # type: ignore[operator]
        **inputs,
        **sampling.generate_kwargs(),
        num_return_sequences=num_samples,
        suppress_tokens=list(suppress_token_ids) or None,
        eos_token_id=eos_ids,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )
    response_ids = sequences[:, prompts.input_ids.shape[1] :]  # [N, L]
    response_mask = response_mask_from_ids(response_ids, eos_ids)
    response_ids = response_ids.masked_fill(response_mask == 0, tokenizer.pad_token_id)
    return response_ids, response_mask


def _eos_token_ids(policy: torch.nn.Module, tokenizer: Any) -> list[int]:
    configured = getattr(getattr(policy, "generation_config", None), "eos_token_id", None)
    ids = set(configured if isinstance(configured, list) else [configured] if configured else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def decode_responses(
    processor: ProcessorMixin, response_ids: torch.Tensor, response_mask: torch.Tensor
) -> list[str]:
    """Decode the valid tokens of each response, special tokens dropped."""
    tokenizer = processor.tokenizer  # type: ignore[attr-defined]
    return [
        tokenizer.decode(ids[mask.bool()].tolist(), skip_special_tokens=True)
        for ids, mask in zip(response_ids, response_mask, strict=True)
    ]


def repeat_columns(columns: Mapping[str, Sequence[Any]], times: int) -> dict[str, list[Any]]:
    """Repeat each prompt's column values ``times`` times, so they align with its responses."""
    return {name: [v for v in values for _ in range(times)] for name, values in columns.items()}


def collect_rollouts(
    policy: torch.nn.Module,
    processor: ProcessorMixin,
    prompts: PromptBatch,
    scorer: Scorer,
    sampling: Sampling,
    *,
    group_size: int,
    suppress_token_ids: Sequence[int] = (),
) -> RolloutBatch:
    """Generate G responses per prompt, decode and score them into a :class:`RolloutBatch`."""
    start = time.perf_counter()
    response_ids, response_mask = generate_responses(
        policy,
        processor,
        prompts,
        sampling,
        num_samples=group_size,
        suppress_token_ids=suppress_token_ids,
    )
    texts = decode_responses(processor, response_ids, response_mask)
    rewards, terms = scorer(texts, repeat_columns(prompts.columns, group_size))
    device = response_ids.device
    return RolloutBatch(
        prompts=prompts,
        prompt_index=torch.arange(prompts.num_prompts, device=device).repeat_interleave(group_size),
        response_ids=response_ids,
        response_mask=response_mask,
        texts=texts,
        rewards=rewards.to(device),
        reward_terms={k: v.to(device) for k, v in terms.items()},
        group_size=group_size,
        rollout_seconds=time.perf_counter() - start,
    )


def rollout_metrics(rollout: RolloutBatch) -> dict[str, float]:
    """Scalars that describe a rollout batch (rewards, lengths, degenerate groups)."""
    rewards = rollout.rewards.float()
    groups = rewards.view(-1, rollout.group_size)
    metrics = {
        "rollout/reward_mean": float(rewards.mean()),
        "rollout/reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
        "rollout/response_length": float(rollout.response_mask.sum(1).float().mean()),
        "rollout/zero_variance_groups": float(
            (groups.max(1).values == groups.min(1).values).float().mean()
        ),
        "rollout/seconds": rollout.rollout_seconds,
    }
    for name, values in rollout.reward_terms.items():
        metrics[f"rollout/{name}"] = float(values.float().mean())
    return metrics
