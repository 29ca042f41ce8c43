"""Sampling G responses per prompt, and scoring them.

The sampler is a :class:`RolloutEngine` (``rollout.engine`` in the config); :class:`HFGenerate`,
Hugging Face ``generate`` configured only from the rollout settings, is the default.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from lightning.pytorch.utilities import rank_zero_info
from transformers import GenerationConfig, ProcessorMixin
from transformers.generation.logits_process import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from cppo_lightning.records import PromptBatch, RolloutBatch, pad_columns
from cppo_lightning.seams import GenerationGroup

#: The scorer's column holding each response's number of tokens (EOS included, as the mask
#: counts it), for reward terms that need it (DAPO's overlong penalty).
RESPONSE_LENGTH = "response_length"

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

    def generation_config(
        self,
        eos_token_ids: Sequence[int],
        pad_token_id: int,
        suppress_token_ids: Sequence[int],
        num_samples: int = 1,
    ) -> GenerationConfig:
        """The whole configuration of HF ``generate``: these settings and nothing else.

        Temperature, top-k and top-p are not in it: :meth:`warpers` applies them, so that the
        log-prob recorder runs after them (HF puts its own warpers after any custom processor).
        When sampling, HF's own warpers are set to no-ops explicitly (HF would otherwise fill in
        its global default ``top_k`` of 50); greedy decoding leaves them unset, as HF expects.
        """
        sample = self.temperature != 0
        neutral = {"temperature": 1.0, "top_k": 0, "top_p": 1.0} if sample else {}
        return GenerationConfig(
            do_sample=sample,
            max_new_tokens=self.max_new_tokens,
            num_return_sequences=num_samples,
            eos_token_id=list(eos_token_ids),
            pad_token_id=pad_token_id,
            suppress_tokens=list(suppress_token_ids) or None,
            use_cache=True,
            **neutral,
        )

    def warpers(self) -> list[LogitsProcessor]:
        """HF's own temperature, top-k and top-p warpers for this sampling, in HF's order."""
        if self.temperature == 0:
            return []
        warpers: list[LogitsProcessor] = []
        if self.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(self.temperature))
        if self.top_k:
            warpers.append(TopKLogitsWarper(top_k=self.top_k))
        if self.top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p=self.top_p))
        return warpers


class SamplerLogps(LogitsProcessor):
    """Records the log-prob of every generated token under the distribution it was drawn from.

    Placed last among the logits processors, it sees the scores the sampler draws from (after
    suppression and the warpers). It keeps one step's ``[N, V]`` log-softmax and, at the next
    step, reads off the token that was drawn (the last column of ``input_ids``), so the cost is
    one ``[N, V]`` buffer, not ``generate``'s ``output_scores`` (``[N, L, V]``).
    """

    def __init__(self) -> None:
        self.previous: torch.Tensor | None = None  # [N, V]
        self.columns: list[torch.Tensor] = []  # L of [N]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        self._take(input_ids)
        self.previous = torch.log_softmax(scores.float(), dim=-1)  # [N, V]
        return scores

    def _take(self, sequences: torch.Tensor) -> None:
        if self.previous is not None:
            self.columns.append(self.previous.gather(-1, sequences[:, -1:]).squeeze(-1))

    def finish(self, sequences: torch.Tensor, length: int) -> torch.Tensor:
        """``[N, length]`` log-probs of the generated tokens (``length`` = tokens generated)."""
        self._take(sequences)
        self.previous = None
        if not self.columns:
            return torch.zeros(sequences.shape[0], length, device=sequences.device)
        logps = torch.stack(self.columns, dim=1)[:, :length]  # [N, L]
        self.columns = []
        return logps


class NoEndBefore(LogitsProcessor):
    """Masks the end-of-sequence tokens until a response has ``min_new_tokens`` tokens, so that
    responses run to a fixed length (benchmarks; see :class:`HFGenerate`).

    Placed after :class:`SamplerLogps`, so the recorded log-probs are the policy's own (what
    training scores), not those of the masked distribution.
    """

    def __init__(
        self, prompt_length: int, min_new_tokens: int, eos_token_ids: Sequence[int]
    ) -> None:
        self.prompt_length = prompt_length
        self.min_new_tokens = min_new_tokens
        self.eos_token_ids = list(eos_token_ids)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] - self.prompt_length >= self.min_new_tokens:
            return scores
        eos = torch.tensor(self.eos_token_ids, device=scores.device)
        return scores.index_fill(-1, eos, float("-inf"))  # [N, V]


class Samples(NamedTuple):
    """Responses sampled for a batch of prompts.

    Attributes:
        response_ids: ``[N, L]`` right-padded after the first end-of-sequence token.
        response_mask: ``[N, L]``.
        sampler_logp: ``[N, L]`` the sampler's log-prob of each token (0 on padding).
    """

    response_ids: torch.Tensor
    response_mask: torch.Tensor
    sampler_logp: torch.Tensor


# Keys of a checkpoint's generation_config that do not change what is sampled.
_NOT_SAMPLING = {
    "transformers_version",
    "_from_model_config",
    "bos_token_id",
    "pad_token_id",
    "eos_token_id",  # merged into the rollout's own end-of-sequence ids
    "use_cache",
    "output_attentions",
    "output_hidden_states",
    "output_scores",
    "output_logits",
    "return_dict_in_generate",
}
_REPORTED: set[str] = set()


def ignored_generation_settings(policy: torch.nn.Module) -> dict[str, Any]:
    """What the checkpoint's ``generation_config`` sets that rollouts do not use (everything but
    the end-of-sequence ids, which are merged into the rollout's own)."""
    config = getattr(_generating_model(policy), "generation_config", None)
    if config is None:
        return {}
    return {
        k: v
        for k, v in sorted(config.to_diff_dict().items())
        if k not in _NOT_SAMPLING and v is not None
    }


def _generating_model(policy: torch.nn.Module) -> torch.nn.Module:
    get_base = getattr(policy, "get_base_model", None)
    return get_base() if callable(get_base) else policy


@contextlib.contextmanager
def _only_these_settings(policy: torch.nn.Module) -> Iterator[None]:
    """``generate`` fills every setting its ``generation_config`` argument leaves unset from the
    model's own ``generation_config`` (the checkpoint's repetition_penalty, top_k, ...). With an
    empty one in its place for the call, only the settings passed in apply."""
    model = _generating_model(policy)
    ignored = ignored_generation_settings(policy)
    key = repr(ignored)
    if ignored and key not in _REPORTED:
        _REPORTED.add(key)
        rank_zero_info(
            "generation: the checkpoint's generation_config settings "
            f"{ignored} are ignored; sampling uses only the rollout settings (temperature, "
            "top_p, top_k, max_new_tokens, end-of-sequence and suppressed tokens)."
        )
    saved = getattr(model, "generation_config", None)
    model.generation_config = GenerationConfig()  # type: ignore[assignment]
    try:
        yield
    finally:
        model.generation_config = saved  # type: ignore[assignment]


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
        responses of one prompt contiguous. :func:`sample_responses` adds the sampler's
        log-probs.
    """
    samples = sample_responses(
        policy,
        processor,
        prompts,
        sampling,
        num_samples=num_samples,
        suppress_token_ids=suppress_token_ids,
    )
    return samples.response_ids, samples.response_mask


@torch.no_grad()
def sample_responses(
    policy: torch.nn.Module,
    processor: ProcessorMixin,
    prompts: PromptBatch,
    sampling: Sampling,
    *,
    num_samples: int,
    suppress_token_ids: Sequence[int] = (),
    min_new_tokens: int = 0,
) -> Samples:
    """Sample ``num_samples`` responses per prompt with HF ``generate``, configured only from
    ``sampling`` (the checkpoint's ``generation_config`` is ignored, see
    :func:`ignored_generation_settings`), recording each token's log-prob under the
    distribution it was drawn from. ``min_new_tokens`` > 0 masks end-of-sequence before that
    many tokens (:class:`NoEndBefore`; the recorded log-probs are then the policy's, unmasked)."""
    tokenizer = processor.tokenizer  # type: ignore[attr-defined]
    per_call = max(1, (sampling.batch_size or 0) // num_samples) if sampling.batch_size else None
    if per_call is not None and per_call < prompts.num_prompts:
        index = torch.arange(prompts.num_prompts, device=prompts.input_ids.device)
        pieces = [
            sample_responses(
                policy,
                processor,
                prompts.subset(chunk),
                dataclasses.replace(sampling, batch_size=None),
                num_samples=num_samples,
                suppress_token_ids=suppress_token_ids,
                min_new_tokens=min_new_tokens,
            )
            for chunk in index.split(per_call)
        ]
        length = max(piece.response_ids.shape[1] for piece in pieces)

        def padded(field: int, value: float) -> torch.Tensor:
            return torch.cat(
                [
                    torch.nn.functional.pad(p[field], (0, length - p[field].shape[1]), value=value)
                    for p in pieces
                ]
            )

        return Samples(padded(0, tokenizer.pad_token_id), padded(1, 0), padded(2, 0.0))
    eos_ids = _eos_token_ids(policy, tokenizer)
    inputs: dict[str, Any] = {
        "input_ids": prompts.input_ids,
        "attention_mask": prompts.attention_mask,
        **prompts.vision,
    }
    if prompts.mm_token_type_ids is not None:
        inputs["mm_token_type_ids"] = prompts.mm_token_type_ids
    recorder = SamplerLogps()
    processors: list[LogitsProcessor] = [*sampling.warpers(), recorder]
    if min_new_tokens > 0:  # after the recorder: it records the policy's own log-probs
        processors.append(NoEndBefore(prompts.input_ids.shape[1], min_new_tokens, eos_ids))
    with _only_these_settings(policy):
        sequences = policy.generate(  # type: ignore[operator]
            **inputs,
            generation_config=sampling.generation_config(
                eos_ids, tokenizer.pad_token_id, suppress_token_ids, num_samples
            ),
            logits_processor=LogitsProcessorList(processors),
        )
    response_ids = sequences[:, prompts.input_ids.shape[1] :]  # [N, L]
    response_mask = response_mask_from_ids(response_ids, eos_ids)
    response_ids = response_ids.masked_fill(response_mask == 0, tokenizer.pad_token_id)
    sampler_logp = recorder.finish(sequences, response_ids.shape[1]) * response_mask  # [N, L]
    return Samples(response_ids, response_mask, sampler_logp)


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


class RolloutEngine(abc.ABC):
    """What turns prompts into sampled responses; chosen under ``rollout.engine`` by
    ``class_path`` (:class:`HFGenerate` when unset).

    Every response goes through it: training rollouts, held-out validation, the ``Evaluation``
    callback and ``cppo evaluate`` (``--engine``). An engine that keeps its own copy of the
    weights (a vLLM server, say) refreshes it in :meth:`on_policy_update`: during fit after
    every training batch's optimizer steps (before the ``Evaluation`` callback samples), in
    ``cppo evaluate`` once, when the policy under evaluation is loaded.
    """

    @abc.abstractmethod
    def sample(
        self,
        policy: torch.nn.Module,
        processor: ProcessorMixin,
        prompts: PromptBatch,
        sampling: Sampling,
        *,
        num_samples: int,
        suppress_token_ids: Sequence[int] = (),
    ) -> Samples:
        """``num_samples`` responses per prompt, those of one prompt contiguous, with their
        mask and the sampler's log-prob of every token (see :class:`Samples`). The policy is
        in eval mode and gradients are off."""

    def on_policy_update(self, policy: torch.nn.Module) -> None:  # noqa: B027 (optional hook)
        """The policy's weights have changed (after an optimizer step); nothing to do here."""


class HFGenerate(RolloutEngine):
    """Hugging Face ``generate`` on the training policy itself (:func:`sample_responses`): no
    second copy of the weights, so nothing to synchronise.

    Args:
        min_new_tokens: For benchmarks (``benchmarks/gpu_check.py``): end-of-sequence is masked
            until a response has this many tokens, so responses run to a fixed length
            (``rollout.max_new_tokens`` when it is at least that). The sampler's log-probs are
            recorded before the masking (the policy's own, which training scores), so
            ``rollout/logp_mismatch`` still measures numerics only, while the forced tokens are
            off-policy by the end-of-sequence mass: not for training runs. 0 leaves generation
            alone.
    """

    min_new_tokens: int = 0  # subclasses that do not call this __init__ sample as before

    def __init__(self, min_new_tokens: int = 0) -> None:
        if isinstance(min_new_tokens, bool) or not isinstance(min_new_tokens, int):
            raise ValueError(f"HFGenerate: min_new_tokens must be an int, got {min_new_tokens!r}.")
        if min_new_tokens < 0:
            raise ValueError(f"HFGenerate: min_new_tokens must be >= 0, got {min_new_tokens}.")
        self.min_new_tokens = min_new_tokens

    def sample(
        self,
        policy: torch.nn.Module,
        processor: ProcessorMixin,
        prompts: PromptBatch,
        sampling: Sampling,
        *,
        num_samples: int,
        suppress_token_ids: Sequence[int] = (),
    ) -> Samples:
        return sample_responses(
            policy,
            processor,
            prompts,
            sampling,
            num_samples=num_samples,
            suppress_token_ids=suppress_token_ids,
            min_new_tokens=self.min_new_tokens,
        )


def check_samples(
    engine: RolloutEngine, samples: Samples, prompts: PromptBatch, num_samples: int
) -> None:
    """Refuse what ``engine.sample`` returned unless it is ``[B * num_samples, L]`` ids and mask."""
    ids, mask = samples.response_ids, samples.response_mask
    if ids.shape != mask.shape or ids.shape[0] != prompts.num_prompts * num_samples:
        raise ValueError(
            f"{type(engine).__name__}.sample returned response_ids {tuple(ids.shape)} "
            f"and response_mask {tuple(mask.shape)} for {prompts.num_prompts} prompts "
            f"x {num_samples} samples: it must return [B * G, L] for both."
        )


def truncated_responses(
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    max_new_tokens: int,
    eos_token_ids: Sequence[int],
) -> torch.Tensor:
    """Which responses were cut by the length limit: ``max_new_tokens`` valid tokens, the last
    of them not an end-of-sequence token (a response that ends with EOS exactly at the limit
    finished).

    Shape:
        response_ids, response_mask: ``[N, L]``; returns ``[N]`` bool.
    """
    lengths = response_mask.sum(1)  # [N]
    last = response_ids.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)  # [N]
    eos = torch.tensor(list(eos_token_ids), device=response_ids.device, dtype=response_ids.dtype)
    return (lengths >= max_new_tokens) & ~torch.isin(last, eos)


def merge_parts(
    pieces: Sequence[Samples], sizes: Sequence[int], pad_token_id: int
) -> tuple[Samples, torch.Tensor]:
    """The responses of a :class:`~cppo_lightning.seams.RolloutView`'s parts as one
    group-contiguous batch: for every prompt its ``sizes[0]`` responses of part 0, then its
    ``sizes[1]`` of part 1, ... (right-padded to the longest).

    Args:
        pieces: Part ``k``'s samples, ``[B * sizes[k], L_k]``, one prompt's contiguous.
        sizes: Responses per prompt of each part.
        pad_token_id: Fills ``response_ids`` beyond a shorter part's length.

    Returns:
        The merged samples ``[B * sum(sizes), L]`` and ``generated_from`` ``[B * sum(sizes)]``,
        the part of each response.
    """
    length = max(p.response_ids.shape[1] for p in pieces)
    num_prompts = pieces[0].response_ids.shape[0] // sizes[0]
    device = pieces[0].response_ids.device
    order: list[int] = []
    part_of: list[int] = []
    starts: list[int] = []
    offset = 0
    for size in sizes:
        starts.append(offset)
        offset += num_prompts * size
    for prompt in range(num_prompts):
        for part, (size, start) in enumerate(zip(sizes, starts, strict=True)):
            order += range(start + prompt * size, start + (prompt + 1) * size)
            part_of += [part] * size
    index = torch.tensor(order, device=device)

    def joined(field: int, value: float) -> torch.Tensor:
        return torch.cat([pad_columns(p[field], length, value) for p in pieces])[index]

    merged = Samples(joined(0, pad_token_id), joined(1, 0), joined(2, 0.0))
    return merged, torch.tensor(part_of, device=device)


def _sample_parts(
    engine: RolloutEngine,
    policy: torch.nn.Module,
    processor: ProcessorMixin,
    prompts: PromptBatch,
    sampling: Sampling,
    parts: Sequence[GenerationGroup],
    group_size: int,
    suppress_token_ids: Sequence[int],
) -> tuple[Samples, torch.Tensor]:
    """Each part's responses from its images (the prompt tokens are the same), merged."""
    sizes = [part.num_samples for part in parts]
    if sum(sizes) != group_size or any(size < 0 for size in sizes):
        raise ValueError(
            f"rollout.view gave parts of {sizes} responses per prompt: they must be >= 0 and sum "
            f"to rollout.group_size={group_size}."
        )
    kept = [part for part in parts if part.num_samples > 0]
    pieces = []
    for part in kept:
        shown = prompts if part.vision is None else prompts._replace(vision=part.vision)
        samples = engine.sample(
            policy,
            processor,
            shown,
            sampling,
            num_samples=part.num_samples,
            suppress_token_ids=suppress_token_ids,
        )
        check_samples(engine, samples, prompts, part.num_samples)
        pieces.append(samples)
    pad = processor.tokenizer.pad_token_id  # type: ignore[attr-defined]
    merged, part_of = merge_parts(pieces, [p.num_samples for p in kept], pad)
    # Back to the view's own part numbers (a part of 0 responses was skipped).
    numbers = torch.tensor(
        [k for k, part in enumerate(parts) if part.num_samples > 0], device=part_of.device
    )
    return merged, numbers[part_of]


def collect_rollouts(
    policy: torch.nn.Module,
    processor: ProcessorMixin,
    prompts: PromptBatch,
    scorer: Scorer,
    sampling: Sampling,
    *,
    group_size: int,
    suppress_token_ids: Sequence[int] = (),
    engine: RolloutEngine | None = None,
    parts: Sequence[GenerationGroup] | None = None,
) -> RolloutBatch:
    """Generate G responses per prompt with ``engine`` (HF ``generate`` when None), decode and
    score them into a :class:`RolloutBatch`.

    With ``parts`` (a :class:`~cppo_lightning.seams.RolloutView`'s), each part's responses are
    sampled from its own images and recorded in ``generated_from``; the batch keeps
    ``prompts`` (the original images), which scoring and training use. The scorer gets the
    prompts' columns plus :data:`RESPONSE_LENGTH`; ``truncated`` marks the responses the
    length limit cut.
    """
    start = time.perf_counter()
    engine = engine if engine is not None else HFGenerate()
    generated_from = None
    if parts is None:
        samples = engine.sample(
            policy,
            processor,
            prompts,
            sampling,
            num_samples=group_size,
            suppress_token_ids=suppress_token_ids,
        )
        check_samples(engine, samples, prompts, group_size)
    else:
        samples, generated_from = _sample_parts(
            engine, policy, processor, prompts, sampling, parts, group_size, suppress_token_ids
        )
    response_ids, response_mask, sampler_logp = samples
    texts = decode_responses(processor, response_ids, response_mask)
    columns = repeat_columns(prompts.columns, group_size)
    if RESPONSE_LENGTH in columns:
        raise ValueError(
            f"the dataset has a column {RESPONSE_LENGTH!r}, which the rollout fills with each "
            "response's token count for the reward terms: rename that column."
        )
    columns[RESPONSE_LENGTH] = response_mask.sum(1).tolist()
    rewards, terms = scorer(texts, columns)
    device = response_ids.device
    eos_ids = _eos_token_ids(policy, processor.tokenizer)  # type: ignore[attr-defined]
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
        sampler_logp=sampler_logp,
        truncated=truncated_responses(
            response_ids, response_mask, sampling.max_new_tokens, eos_ids
        ),
        generated_from=generated_from,
    )


@dataclasses.dataclass
class GroupPool:
    """The groups of a rollout filter's generation rounds (DAPO's dynamic sampling).

    Each round's rollout batch is split by the filter's verdict into kept (informative) and
    dropped groups, each kept in generation order (round by round, prompt order within a round)
    and at most ``target`` of each: more kept groups are never trained on, and dropped groups
    only fill a batch whose rounds ran out (:meth:`batch`).

    Attributes:
        target: The groups a training batch holds (``data.batch_size``).
        pad_token_id: Pads the rounds' prompts and responses to a common length.
        kept: The informative groups so far (at most ``target``), or None.
        dropped: The filtered-out groups so far (at most ``target``), or None.
        rounds: Generation rounds added.
        dropped_groups: Groups the filter rejected, over all rounds.
        rows: Dataset rows of every prompt generated (not to be drawn again this step).
        seconds: Time spent generating and scoring, over all rounds.
    """

    target: int
    pad_token_id: int
    kept: RolloutBatch | None = None
    dropped: RolloutBatch | None = None
    rounds: int = 0
    dropped_groups: int = 0
    rows: list[int] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def add(self, rollout: RolloutBatch, keep: torch.Tensor) -> None:
        """One round: ``rollout`` and the filter's ``[B]`` verdict on its groups."""
        keep = keep.bool().to(rollout.response_ids.device)
        if keep.shape != (rollout.num_groups,):
            raise ValueError(
                f"rollout.filter returned {tuple(keep.shape)} for {rollout.num_groups} groups: "
                "it must return one bool per group."
            )
        self.rounds += 1
        self.dropped_groups += int((~keep).sum())
        self.seconds += rollout.rollout_seconds
        if rollout.prompts.row_index is not None:
            self.rows += rollout.prompts.row_index.tolist()
        self.kept = self._extend(self.kept, rollout, keep)
        self.dropped = self._extend(self.dropped, rollout, ~keep)

    def _extend(
        self, pool: RolloutBatch | None, rollout: RolloutBatch, chosen: torch.Tensor
    ) -> RolloutBatch | None:
        have = 0 if pool is None else pool.num_groups
        groups = chosen.nonzero().flatten()[: self.target - have]
        if len(groups) == 0:
            return pool
        picked = rollout.select_groups(groups)
        return picked if pool is None else RolloutBatch.concat([pool, picked], self.pad_token_id)

    @property
    def enough(self) -> bool:
        """Whether ``target`` informative groups were found."""
        return self.kept_groups >= self.target

    @property
    def available(self) -> int:
        """Groups a batch can hold: ``target``, or fewer if the rounds made fewer groups."""
        return min(
            self.target, sum(p.num_groups for p in (self.kept, self.dropped) if p is not None)
        )

    def batch(self, size: int) -> RolloutBatch:
        """``size`` groups (at most :attr:`available`): the kept ones in generation order, then,
        if they are fewer, the first dropped ones (whose rewards are all equal: no signal, but
        the same number of groups on every rank). ``rollout_seconds`` is every round's."""
        if not 0 < size <= self.available:
            raise ValueError(f"GroupPool.batch: size {size} not in [1, {self.available}].")
        kept = self.kept_groups
        pieces = []
        if kept:
            assert self.kept is not None
            pieces.append(self._first(self.kept, min(size, kept)))
        if size > kept:
            assert self.dropped is not None
            pieces.append(self._first(self.dropped, size - kept))
        merged = RolloutBatch.concat(pieces, self.pad_token_id)
        return dataclasses.replace(merged, rollout_seconds=self.seconds)

    @staticmethod
    def _first(pool: RolloutBatch, count: int) -> RolloutBatch:
        if count == pool.num_groups:
            return pool
        return pool.select_groups(torch.arange(count, device=pool.response_ids.device))

    @property
    def kept_groups(self) -> int:
        """Informative groups found (at most ``target``)."""
        return 0 if self.kept is None else self.kept.num_groups


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
    if rollout.truncated is not None:  # cut by rollout.max_new_tokens (no end-of-sequence)
        metrics["rollout/truncated_fraction"] = float(rollout.truncated.float().mean())
    for name, values in rollout.reward_terms.items():
        metrics[f"rollout/{name}"] = float(values.float().mean())
    return metrics
