r"""The figures of one (benchmark, image condition): avg@k, its spread, pass@k, how answers move.

Everything is computed from sums over prompts (:class:`ConditionStats`), so ranks that each scored
a share of the prompts add their sums (one all-reduce of :meth:`ConditionStats.to_tensor`) and get
the same figures as one process that scored them all.

Definitions (``c[i, j]`` = 1 if sample ``j`` of prompt ``i`` is correct; n prompts, k samples):

- ``accuracy`` (avg@k): ``mean_ij c[i, j]``.
- ``std``: the standard deviation, over the k *sample sets* ``S_j = {sample j of every prompt}``,
  of the accuracy of each set, ``acc_j = mean_i c[i, j]``; the sample (n - 1) standard deviation
  over j, as ``numpy.std(ddof=1)``; 0 when k = 1. This is the "± std" of the CPPO paper's table.
- ``ci95``: a 95% interval over prompts for the accuracy: ``mean ± 1.96 * sd(p) / sqrt(n)`` with
  ``p_i = mean_j c[i, j]`` (normal approximation, clipped to [0, 1]; ``[0, 1]`` when n < 2).
- ``pass_at_k``: share of prompts with at least one correct sample.
- ``answer_kept``: share of prompts whose majority answer (:func:`majority_answer`) is the one
  they have under ``original`` images; None for ``original`` itself.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence
from typing import Any

import torch

Z95 = 1.959963984540054  # two-sided 95% quantile of the standard normal


class _NoReference:
    def __repr__(self) -> str:
        return "NO_REFERENCE"


#: ``reference`` of :meth:`ConditionStats.add` for a prompt with nothing to compare with (the
#: ``original`` condition itself); distinct from None, which is a majority of "no answer".
NO_REFERENCE: Any = _NoReference()


def majority_answer(answers: Sequence[str | None]) -> str | None:
    r"""The most frequent answer among a prompt's samples (None = no closed ``\boxed{}``), ties
    broken by the sample that gave it first. Answers are compared after normalisation (see
    :func:`cppo_lightning.rewards.normalize_answer`), which the caller applies."""
    if not answers:
        return None
    counts = collections.Counter(answers)
    best = max(counts.values())
    return next(answer for answer in answers if counts[answer] == best)


class ConditionStats:
    """Sums over the prompts of one (benchmark, condition) from which every figure follows.

    Args:
        k: Samples per prompt.
        categories: The category values of the benchmark (fixed, so that ranks' sums line up);
            empty when the benchmark has no category column.
    """

    def __init__(self, k: int, categories: Sequence[str] = ()) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}.")
        self.k = k
        self.categories = list(categories)
        self._category_index = {name: i for i, name in enumerate(self.categories)}
        self.n = 0.0
        self.per_sample = torch.zeros(k, dtype=torch.float64)  # [k] correct per sample set
        self.sum_p = 0.0  # sum of per-prompt accuracies
        self.sum_p2 = 0.0  # sum of their squares
        self.passed = 0.0  # prompts with >= 1 correct sample
        self.formatted = 0.0  # responses in the required format
        self.length = 0.0  # response tokens, summed
        self.compared = 0.0  # prompts with a reference (original) majority answer
        self.kept = 0.0  # ... whose majority answer equals it
        self.category_correct = torch.zeros(len(self.categories), dtype=torch.float64)
        self.category_count = torch.zeros(len(self.categories), dtype=torch.float64)

    def add(
        self,
        correct: Sequence[bool],
        formatted: Sequence[bool],
        lengths: Sequence[int],
        category: str | None = None,
        majority: str | None = None,
        reference: str | None = NO_REFERENCE,
    ) -> None:
        """Add one prompt's k samples.

        Args:
            correct: k flags, one per sample (in sample order).
            formatted: k flags: the response has the required format.
            lengths: k response lengths in tokens.
            category: The prompt's category (must be one of ``categories``), or None.
            majority: The prompt's majority answer under this condition.
            reference: The prompt's majority answer under ``original`` to compare ``majority``
                with; :data:`NO_REFERENCE` when there is none.
        """
        if not len(correct) == len(formatted) == len(lengths) == self.k:
            raise ValueError(f"a prompt needs {self.k} samples, got {len(correct)}.")
        hits = torch.tensor([float(c) for c in correct], dtype=torch.float64)
        p = float(hits.mean())
        self.n += 1
        self.per_sample += hits
        self.sum_p += p
        self.sum_p2 += p * p
        self.passed += float(p > 0)
        self.formatted += float(sum(bool(f) for f in formatted))
        self.length += float(sum(lengths))
        if reference is not NO_REFERENCE:
            self.compared += 1
            self.kept += float(majority == reference)
        if category is not None and self.categories:
            if category not in self._category_index:
                raise ValueError(f"unknown category {category!r}; known: {self.categories}.")
            i = self._category_index[category]
            self.category_correct[i] += float(hits.sum())
            self.category_count[i] += self.k

    # The scalar sums, in the order of the flat layout (then the k per-sample sums, then the
    # category sums).
    _SCALARS = ("n", "sum_p", "sum_p2", "passed", "formatted", "length", "compared", "kept")

    def to_tensor(self) -> torch.Tensor:
        """All sums as one float64 vector (add the vectors of several ranks, then
        :meth:`load_tensor`)."""
        scalars = torch.tensor([getattr(self, name) for name in self._SCALARS], dtype=torch.float64)
        return torch.cat([scalars, self.per_sample, self.category_correct, self.category_count])

    def load_tensor(self, values: torch.Tensor) -> ConditionStats:
        """Set the sums from a vector laid out like :meth:`to_tensor`'s (e.g. summed over
        ranks)."""
        values = values.detach().to("cpu", torch.float64)
        s, k, c = len(self._SCALARS), self.k, len(self.categories)
        if values.numel() != s + k + 2 * c:
            raise ValueError(f"expected {s + k + 2 * c} values, got {values.numel()}.")
        for name, value in zip(self._SCALARS, values[:s].tolist(), strict=True):
            setattr(self, name, value)
        self.per_sample = values[s : s + k].clone()
        self.category_correct = values[s + k : s + k + c].clone()
        self.category_count = values[s + k + c :].clone()
        return self

    def summary(self) -> dict[str, object]:
        """The figures of the results schema (``accuracy``, ``std``, ``ci95``, ``pass_at_k``,
        ``format_rate``, ``response_length``, ``answer_kept``, ``by_category``)."""
        n, k = self.n, self.k
        if n == 0:
            nan = float("nan")
            return {
                "n": 0,
                "k": k,
                "accuracy": nan,
                "std": nan,
                "ci95": [nan, nan],
                "pass_at_k": nan,
                "format_rate": nan,
                "response_length": nan,
                "answer_kept": None,
                "by_category": {},
            }
        accuracy = self.sum_p / n
        per_set = self.per_sample / n  # [k] accuracy of each sample set
        std = float(per_set.std(correction=1)) if k > 1 else 0.0
        if n >= 2:
            variance = max(0.0, (self.sum_p2 - n * accuracy * accuracy) / (n - 1))
            half = Z95 * math.sqrt(variance / n)
            ci95 = [max(0.0, accuracy - half), min(1.0, accuracy + half)]
        else:
            ci95 = [0.0, 1.0]
        by_category = {
            name: float(self.category_correct[i] / self.category_count[i])
            for i, name in enumerate(self.categories)
            if self.category_count[i] > 0
        }
        return {
            "n": int(n),
            "k": k,
            "accuracy": accuracy,
            "std": std,
            "ci95": ci95,
            "pass_at_k": self.passed / n,
            "format_rate": self.formatted / (n * k),
            "response_length": self.length / (n * k),
            "answer_kept": self.kept / self.compared if self.compared else None,
            "by_category": by_category,
        }
