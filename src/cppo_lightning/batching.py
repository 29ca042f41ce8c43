"""How the responses of a mini-batch are cut into micro-batches, and what each one weighs.

Two ways to cut: a fixed number of responses per micro-batch (``model.micro_batch_size``), or
a token budget (``model.micro_batch_tokens``), where responses sorted by length are packed while
``responses x (prompt + longest response)`` stays within the budget (the budgeting of verl's
dynamic batch size). Each micro-batch is then cut to its own longest response
(:meth:`~cppo_lightning.records.RolloutBatch.take`), so short responses are not padded to the
batch's longest.

This is not padding-free (verl's remove-padding, TRL's ``padding_free``, which concatenate the
sequences into one row for variable-length attention): every micro-batch is still a rectangle,
its responses right-padded to the micro-batch's longest and its prompts left-padded to the
rollout batch's longest prompt. Sorting by length keeps the response padding small (about 9% of
the tokens processed on the embedded model, docs/results.md), and the budget counts it.

Whatever the cut, the gradient is the one of the whole mini-batch under ``loss_agg``: each
micro-batch's loss (aggregated over its own tokens) is multiplied by its share of the
mini-batch's normaliser (:func:`micro_batch_weights`) and the shares sum to 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["equalise_count", "micro_batch_weights", "pack_by_tokens"]


def pack_by_tokens(lengths: Tensor, prompt_length: int, budget: int) -> list[Tensor]:
    """Micro-batches (positions into ``lengths``) under a token budget.

    Responses are sorted by length (ascending, ties by position) and added to the current
    micro-batch while ``count * (prompt_length + longest)`` stays within ``budget``; a response
    that alone exceeds it gets a micro-batch of its own.

    Shape:
        lengths: ``[m]`` valid tokens per response; returns index tensors that partition
        ``arange(m)``.
    """
    order = sorted(range(len(lengths)), key=lambda i: (int(lengths[i]), i))
    micros: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = int(lengths[i])  # sorted: the newcomer is the longest
        if current and (len(current) + 1) * (prompt_length + longest) > budget:
            micros.append(current)
            current = []
        current.append(i)
    if current:
        micros.append(current)
    return [torch.tensor(m, dtype=torch.long, device=lengths.device) for m in micros]


def equalise_count(micros: list[Tensor], count: int) -> list[Tensor]:
    """Split the largest micro-batches in two until there are ``count`` of them (under DDP and
    FSDP every rank must run the same number of forwards and backwards).

    Raises:
        ValueError: If there are fewer responses than ``count``.
    """
    micros = list(micros)
    if sum(len(m) for m in micros) < count:
        raise ValueError(
            f"this rank holds {sum(len(m) for m in micros)} responses but another rank cut its "
            f"mini-batch into {count} micro-batches: raise model.micro_batch_tokens so that "
            "fewer micro-batches are needed."
        )
    while len(micros) < count:
        largest = max(range(len(micros)), key=lambda i: len(micros[i]))
        piece = micros.pop(largest)
        half = (len(piece) + 1) // 2
        micros[largest:largest] = [piece[:half], piece[half:]]
    return micros


def micro_batch_weights(masks: list[Tensor], agg: str) -> list[float]:
    """Each micro-batch's share of the mini-batch's ``loss_agg`` normaliser.

    With ``loss_k = aggregate(values_k, mask_k, agg)``, ``sum_k w_k * loss_k`` equals
    ``aggregate`` over the whole mini-batch:

    - ``token-mean``: valid tokens of k over valid tokens of the mini-batch;
    - ``seq-mean-token-mean``: responses with a valid token in k over those of the mini-batch;
    - ``seq-sum-constant``: responses in k over responses in the mini-batch.

    Shape:
        masks: one ``[n_k, L_k]`` response mask per micro-batch.
    """
    if agg == "token-mean":
        sizes = [float(m.bool().sum()) for m in masks]
    elif agg == "seq-mean-token-mean":
        sizes = [float((m.bool().sum(1) > 0).sum()) for m in masks]
    elif agg == "seq-sum-constant":
        sizes = [float(m.shape[0]) for m in masks]
    else:
        raise ValueError(f"unknown loss_agg {agg!r}.")
    total = sum(sizes)
    if total == 0:  # nothing valid anywhere: every loss is 0, any weights will do
        return [1.0 / len(masks)] * len(masks) if masks else []
    return [size / total for size in sizes]
