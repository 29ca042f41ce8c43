r"""The work of an evaluation: units of prompts, their images under a condition, responses graded.

An evaluation is cut into **units**: batch ``b`` of a set's rows (fixed by the batch size) under
one image condition. A unit's samples are drawn from a seed of its own, derived from the run's
seed, the set and ``b`` (not the condition: the conditions of a batch share their random numbers,
so differences between them come from the images alone). A unit's responses therefore do not
depend on which rank scores it, in what order, or whether the run was interrupted before: that is
what makes a resumed or a multi-process run give the numbers of one uninterrupted process.
Ranks take the batches ``b`` with ``b % world_size == rank``, every condition of a batch on the
same rank.

:func:`score_batch` is shared by ``cppo evaluate`` (Lightning's predict loop) and the in-training
:class:`~cppo_lightning.callbacks.Evaluation` callback; it samples through a
:class:`~cppo_lightning.rollout.RolloutEngine` (``cppo evaluate --engine``, the run's
``rollout.engine`` in fit).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import datasets
import torch
from PIL import Image

from cppo_lightning.data.rows import DropReport
from cppo_lightning.evaluation.conditions import ImageConditions, shuffle_partners
from cppo_lightning.evaluation.sets import LETTERS, EvalSet
from cppo_lightning.records import PromptBatch
from cppo_lightning.rewards import extract_boxed, is_equivalent, normalize_answer
from cppo_lightning.rollout import (
    RolloutEngine,
    Sampling,
    check_samples,
    decode_responses,
    repeat_columns,
)

_SEED_DOMAIN = b"cppo-eval-seed1"


def batch_seed(seed: int, benchmark: str, index: int) -> int:
    """The sampling seed of batch ``index`` of ``benchmark`` (63 bits, BLAKE2b-mixed)."""
    message = f"{seed}|{index}|".encode() + benchmark.encode()
    digest = hashlib.blake2b(message, digest_size=8, person=_SEED_DOMAIN).digest()
    return int.from_bytes(digest, "big") >> 1


class EvalUnit(NamedTuple):
    """One batch of one set's rows under one image condition (a NamedTuple, so that Lightning
    moves the batch that holds it to the device as it is).

    Attributes:
        benchmark: The set's name.
        condition: The image condition.
        batch: The batch's index in the set (the same for every condition).
        rows: The rows (positions in the set's scored rows).
        seed: The sampling seed (:func:`batch_seed`).
    """

    benchmark: str
    condition: str
    batch: int
    rows: tuple[int, ...]
    seed: int


class EvalBatch(NamedTuple):
    """A unit and its collated prompts (what the predict loop's batches are)."""

    unit: EvalUnit
    prompts: PromptBatch


class PreparedSet:
    """An :class:`EvalSet` with its scored rows loaded, ready to make batches under conditions.

    Args:
        eval_set: The set.
        processor: The model's processor.
        need_partners: Compute the ``shuffled`` partners (decodes every image once).
        seed: Seed of the shuffle.
    """

    def __init__(
        self, eval_set: EvalSet, processor: Any, need_partners: bool = False, seed: int = 0
    ) -> None:
        self.eval_set = eval_set
        self.name = eval_set.name
        self.rows: datasets.Dataset
        self.report: DropReport
        self.rows, self.report = eval_set.load(processor)
        self.collator = eval_set.collator(processor)
        categories = self.rows["category"]
        self.categories = sorted({c for c in categories if c}) if eval_set.category_column else []
        self.partners: list[int] = []
        self.resized: list[bool] = []
        if need_partners:
            sizes = [
                tuple(image.size for image in eval_set.images(self.rows[i]))
                for i in range(len(self.rows))
            ]
            self.partners, self.resized = shuffle_partners(sizes, seed)

    def __len__(self) -> int:
        return len(self.rows)

    def prompts(self, unit: EvalUnit, conditions: ImageConditions) -> PromptBatch:
        """The unit's rows collated, their images replaced as its condition says."""
        rows = []
        for row in unit.rows:
            record = dict(self.rows[row])
            images = self.eval_set.images(record)
            partner: Callable[[], list[Image.Image]] | None = None
            if unit.condition == "shuffled":
                other = self.partners[row]
                partner = lambda other=other: self.eval_set.images(self.rows[other])  # noqa: E731
            record["image"] = conditions.apply(unit.condition, images, row, partner)
            rows.append(record)
        return self.collator(rows)


def plan_units(
    sets: Sequence[PreparedSet], conditions: Sequence[str], batch_size: int, seed: int
) -> list[EvalUnit]:
    """Every unit of an evaluation: set by set, batch by batch, the conditions of a batch in a
    row."""
    units = []
    for prepared in sets:
        n = len(prepared)
        for index, start in enumerate(range(0, n, batch_size)):
            rows = tuple(range(start, min(start + batch_size, n)))
            for condition in conditions:
                units.append(
                    EvalUnit(
                        prepared.name,
                        condition,
                        index,
                        rows,
                        batch_seed(seed, prepared.name, index),
                    )
                )
    return units


def shard(units: Sequence[EvalUnit], rank: int, world_size: int) -> list[EvalUnit]:
    """The units of ``rank``: the batches ``batch % world_size == rank``."""
    return [unit for unit in units if unit.batch % world_size == rank]


def answer_key(answer: str | None) -> str | None:
    """An extracted answer as majority votes compare it (normalised; None = no answer)."""
    return None if answer is None else normalize_answer(answer)


def grade(
    eval_set: EvalSet, texts: Sequence[str], columns: dict[str, list[Any]]
) -> tuple[list[bool], list[bool]]:
    r"""``(correct, formatted)`` of each response, by the set's grader and format reward.

    A multiple-choice response also counts as correct when its ``\boxed{}`` holds the text of
    the right option instead of its letter.
    """
    correct = [float(v) > 0 for v in eval_set.grader(texts, **columns)]
    formatted = [float(v) > 0 for v in eval_set.format_reward(texts, **columns)]
    options = columns.get("options") or [None] * len(texts)
    for i, text in enumerate(texts):
        if correct[i] or not options[i]:
            continue
        boxed = extract_boxed(text)
        letter = str(columns["answer"][i])  # option_letter made it an upper-case letter
        position = LETTERS.find(letter) if len(letter) == 1 else -1
        if boxed is not None and 0 <= position < len(options[i]):
            correct[i] = is_equivalent(boxed, options[i][position])
    return correct, formatted


@torch.no_grad()
def score_batch(
    engine: RolloutEngine,
    policy: torch.nn.Module,
    processor: Any,
    batch: EvalBatch,
    eval_set: EvalSet,
    sampling: Sampling,
    samples: int,
    suppress_token_ids: Sequence[int] = (),
) -> list[dict[str, Any]]:
    """Sample ``samples`` responses per prompt of a unit with ``engine``, from the unit's seed,
    and grade them.

    The global RNG is left as it was (the draw runs in a forked, seeded RNG), so this can run in
    the middle of training.

    Returns:
        One record per response (the ``responses.jsonl`` schema): ``benchmark``, ``images``,
        ``prompt_id``, ``row``, ``sample``, ``response``, ``answer`` (the last ``\boxed{}``, or
        None), ``truth``, ``correct``, ``format``, ``length`` (tokens), ``category``.
    """
    unit, prompts = batch
    device = prompts.input_ids.device
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.random.default_generator.manual_seed(unit.seed)
        if devices:
            torch.cuda.manual_seed(unit.seed)
        drawn = engine.sample(
            policy,
            processor,
            prompts,
            sampling,
            num_samples=samples,
            suppress_token_ids=suppress_token_ids,
        )
    check_samples(engine, drawn, prompts, samples)
    response_ids, response_mask = drawn.response_ids, drawn.response_mask
    texts = decode_responses(processor, response_ids, response_mask)
    columns = repeat_columns(prompts.columns, samples)
    correct, formatted = grade(eval_set, texts, columns)
    lengths = response_mask.sum(1).tolist()
    records = []
    for i, text in enumerate(texts):
        prompt = i // samples
        records.append(
            {
                "benchmark": unit.benchmark,
                "images": unit.condition,
                "prompt_id": columns["prompt_id"][i],
                "row": unit.rows[prompt],
                "sample": i % samples,
                "response": text,
                "answer": extract_boxed(text),
                "truth": columns["answer"][i],
                "correct": bool(correct[i]),
                "format": bool(formatted[i]),
                "length": int(lengths[i]),
                "category": columns["category"][i] or None,
            }
        )
    return records
