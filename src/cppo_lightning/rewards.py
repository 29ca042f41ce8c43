"""Reward functions: plain callables, swappable from YAML.

A reward function takes the decoded responses and the dataset columns of their prompts as keyword
arguments (one list per column, aligned with ``completions``) and returns one float per response:

    def my_reward(completions: list[str], *, answer: list[str], **columns) -> list[float]

:class:`WeightedReward` combines named terms into the scalar the RL objective sees (the paper's
``0.9 * accuracy + 0.1 * format``) and keeps every term so that each can be logged.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

RewardFunction = Callable[..., Sequence[float]]

# The whole response: reasoning in <think>...</think>, then a \boxed{} answer (spec §1).
_FORMAT = re.compile(r"^<think>.*</think>.*\\boxed\{.*\}.*$", re.DOTALL)


def extract_boxed(text: str) -> str | None:
    r"""Return the content of the last ``\boxed{...}`` in ``text``, braces balanced, or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i = start + len("\\boxed{")
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None  # unbalanced: the response was cut before the answer closed


def normalize_answer(answer: str) -> str:
    """Canonical form for exact-match grading: trimmed, lower case, inner spaces removed."""
    return re.sub(r"\s+", "", answer.strip().lower()).rstrip(".")


def accuracy_reward(completions: Sequence[str], *, answer: Sequence[str], **_: Any) -> list[float]:
    r"""1.0 where the last ``\boxed{}`` of a response equals the true ``answer``, else 0.0."""
    scores = []
    for text, truth in zip(completions, answer, strict=True):
        boxed = extract_boxed(text)
        scores.append(
            float(boxed is not None and normalize_answer(boxed) == normalize_answer(truth))
        )
    return scores


def format_reward(completions: Sequence[str], **_: Any) -> list[float]:
    r"""1.0 where the whole response matches ``<think>.*</think>.*\boxed{.*}.*``, else 0.0."""
    return [float(_FORMAT.match(text.strip()) is not None) for text in completions]


class WeightedReward:
    """A weighted sum of named reward terms; every term is kept for logging.

    Args:
        functions: Name -> reward callable ``f(completions, **columns) -> list[float]``. Give a
            dotted import path in YAML, e.g. ``accuracy: cppo_lightning.rewards.accuracy_reward``.
        weights: Name -> weight of that term in the total. Every name of ``functions`` needs one.
    """

    def __init__(
        self,
        functions: dict[str, RewardFunction] | None = None,
        weights: dict[str, float] | None = None,
    ) -> None:
        if functions is None:
            functions = {"accuracy": accuracy_reward, "format": format_reward}
        if weights is None:
            weights = {"accuracy": 0.9, "format": 0.1}
        if not functions:
            raise ValueError("reward.functions is empty: name at least one reward function.")
        missing = set(functions) - set(weights)
        extra = set(weights) - set(functions)
        if missing or extra:
            raise ValueError(
                "reward.weights must name exactly the terms of reward.functions: "
                f"missing weights for {sorted(missing)}, "
                f"weights without a function {sorted(extra)}."
            )
        for name, fn in functions.items():
            if not callable(fn):
                raise ValueError(f"reward.functions.{name} is not callable: got {fn!r}.")
        self.functions = dict(functions)
        self.weights = dict(weights)

    def __call__(
        self, completions: Sequence[str], columns: Mapping[str, Sequence[Any]]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Score responses.

        Args:
            completions: N decoded responses.
            columns: Dataset column name -> N values (the prompt's row repeated per response).

        Returns:
            ``(total [N], {term name: [N]})`` as float32 CPU tensors.
        """
        terms: dict[str, torch.Tensor] = {}
        for name, fn in self.functions.items():
            values = list(fn(completions, **columns))
            if len(values) != len(completions):
                raise ValueError(
                    f"reward function {name!r} returned {len(values)} scores for "
                    f"{len(completions)} responses: it must return one float per response."
                )
            terms[name] = torch.tensor(values, dtype=torch.float32)
        total = sum(self.weights[name] * value for name, value in terms.items())
        assert isinstance(total, torch.Tensor)
        return total, terms
