r"""Reward functions: plain callables, swappable from YAML.

A reward function takes the decoded responses and the dataset columns of their prompts as keyword
arguments (one list per column, aligned with ``completions``) and returns one float per response:

    def my_reward(completions: list[str], *, answer: list[str], **columns) -> list[float]

:class:`WeightedReward` combines named terms into the scalar the RL objective sees (the paper's
``0.9 * accuracy + 0.1 * format``) and keeps every term so that each can be logged. A term that
raises, or returns NaN/inf, scores 0 on the responses it failed on instead of stopping training;
the failures are counted in ``last_errors`` / ``total_errors`` and warned about once per term.
A term that fails on *every* response of ``stop_after`` batches in a row (a broken function, not
an odd response) raises :class:`RewardFailure`, and the run stops after saving.

Answer grading uses `math-verify <https://github.com/huggingface/Math-Verify>`_: it is maintained
by Hugging Face, is the verifier of TRL's and open-r1's accuracy rewards, and decides LaTeX/sympy
equivalence (``0.5`` = ``\frac{1}{2}``, ``2\sqrt{3}`` = ``\sqrt{12}``, ``14.0`` = ``14``, units
and degree signs dropped); mathruler, the other candidate, is a single 2025 release. Answers that
are not mathematics (words, multiple-choice letters) are graded by normalised exact match, because
math-verify's LaTeX parser reads ``yes`` as the product ``y*e*s``.

Timeouts: math-verify bounds each parse and comparison with ``signal.alarm``, which only works in
the main thread (elsewhere it raises ``ValueError``). :func:`is_equivalent` therefore passes
``parsing_timeout`` / ``timeout_seconds`` = :data:`MATH_VERIFY_TIMEOUT_S` in the main thread and
``None`` (no alarm, no signal handling) in any other thread. Without the alarm nothing bounds
sympy's time, so answers that can blow up are graded by exact match only, in every thread: longer
than :data:`MAX_MATH_ANSWER_CHARS`, with ``\sum``/``\prod``/``\binom``/``\int``/``\lim`` (evaluated
while parsing: ``\binom{10^{10}}{5000000}`` never returns), or with huge exponents or factorials
(``9^{9^{9^9}}``, ``(x+1)^{1000}``). That stops the blow-ups found so far, not every possible one
(``(a+b+c+d+e+f)^{20}`` still runs for over 8 s), so prefer scoring in the main thread. There, the
alarm replaces any SIGALRM handler during a call and cancels a pending ``signal.alarm``.
"""

from __future__ import annotations

import math
import re
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import sympy
import torch
from math_verify import parse, verify

RewardFunction = Callable[..., Sequence[float]]

# The whole response: reasoning in <think>...</think>, then a \boxed{} answer (docs/method.md §1).
_FORMAT = re.compile(r"^<think>.*</think>.*\\boxed\{.*\}.*$", re.DOTALL)

#: Seconds math-verify may spend on one parse or one comparison (main thread only, see above).
MATH_VERIFY_TIMEOUT_S = 3
#: Longer answers skip math-verify (exact match only): bounds parsing time without a timeout.
MAX_MATH_ANSWER_CHARS = 1000
# Numeric exponents / factorial arguments above this are not given to sympy (9^{9^{9^9}} hangs).
_MAX_NUMERIC_ARG = 1000
_MAX_SYMBOLIC_EXPONENT = 20  # the same for powers of expressions with variables
# LaTeX that math-verify's parser evaluates eagerly, unboundedly (\binom{10^{10}}{5000000},
# \sum_{i=1}^{10^{10}} i^i): such answers are graded by exact match only.
_EAGER_LATEX = re.compile(
    r"\\(?:sum|prod|binom|dbinom|tbinom|choose|int|iint|iiint|oint|lim|limsup|liminf)(?![A-Za-z])"
)
_COMBINATORIAL = (
    sympy.factorial,
    sympy.factorial2,
    sympy.subfactorial,
    sympy.binomial,
    sympy.gamma,
    sympy.RisingFactorial,
    sympy.FallingFactorial,
)
# \text{yes} -> yes (also \textbf, \mathrm, \mbox, ...), for exact matching.
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
# A multiple-choice letter: "B", "(B)", "B." or "B)".
_CHOICE = re.compile(r"^\(?([a-z])\)?\.?$")
# Two letters in a row outside a LaTeX command: a word, which math-verify would multiply out.
_LATEX_COMMAND = re.compile(r"\\[A-Za-z]+")
_WORD = re.compile(r"[A-Za-z]{2,}")


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


def _exact_form(answer: str) -> str:
    r"""``normalize_answer`` after unwrapping ``\text{...}``-like commands."""
    return normalize_answer(_TEXT_WRAPPER.sub(r"\1", answer))


def _is_tame(expr: Any) -> bool:
    """False if sympy could take unbounded time on ``expr`` (huge exponents or factorials)."""
    if isinstance(expr, sympy.MatrixBase):
        return all(_is_tame(e) for e in expr)
    if not isinstance(expr, sympy.Basic):
        return True
    # Bottom-up: when a node is checked its arguments already passed, so evaluating them is cheap.
    for node in sympy.postorder_traversal(expr):
        if isinstance(node, sympy.Pow):
            # Expanding (x+1)^1000 takes seconds; 2^1000 is instant.
            limit = _MAX_SYMBOLIC_EXPONENT if node.base.free_symbols else _MAX_NUMERIC_ARG
            args: tuple[Any, ...] = (node.exp,)
        elif isinstance(node, _COMBINATORIAL):
            limit, args = _MAX_NUMERIC_ARG, node.args
        else:
            continue
        for arg in args:
            if arg.free_symbols:
                continue
            try:
                magnitude = abs(complex(arg.evalf(15)))
            except (TypeError, ValueError, ArithmeticError):
                return False
            if not magnitude <= limit:  # also catches nan
                return False
    return True


def _parse_math(answer: str, timeout: int | None) -> list[Any] | None:
    """math-verify's parse of ``answer``, or None where it is not (safely) mathematics."""
    if len(answer) > MAX_MATH_ANSWER_CHARS or _EAGER_LATEX.search(answer):
        return None
    # Wrapped in \boxed{} so that LaTeX and plain numbers both parse (math-verify's README).
    parsed = parse(
        f"\\boxed{{{answer}}}",
        fallback_mode="no_fallback",  # no raw-string fallbacks: strings are compared below
        parsing_timeout=timeout,  # type: ignore[arg-type]  # None is documented: no alarm
    )
    if not parsed:
        return None
    if _WORD.search(_LATEX_COMMAND.sub("", answer)) and any(
        getattr(p, "free_symbols", True) for p in parsed
    ):
        return None  # words read as products of symbols: "red circle" = "circle red"
    if not all(_is_tame(p) for p in parsed):
        return None
    return parsed


def is_equivalent(prediction: str, truth: str) -> bool:
    r"""Whether a boxed answer ``prediction`` is a correct answer for the ground truth ``truth``.

    ``truth`` may be a bare answer or contain a ``\boxed{}`` (its last one is used). Equal strings
    after :func:`normalize_answer` always match; a multiple-choice letter truth (``B``) matches
    ``B``, ``(B)``, ``B.``, ``\text{B}`` in any case; otherwise both sides go through math-verify,
    and an answer that does not parse as mathematics (words) only matches by exact string.
    """
    gold = extract_boxed(truth) if "\\boxed{" in truth else None
    if gold is None:
        gold = truth
    pred_form, gold_form = _exact_form(prediction), _exact_form(gold)
    if pred_form == gold_form:
        return True
    gold_choice = _CHOICE.match(gold_form)
    if gold_choice is not None:
        pred_choice = _CHOICE.match(pred_form)
        return pred_choice is not None and pred_choice.group(1) == gold_choice.group(1)
    # signal.alarm only works in the main thread; elsewhere math-verify must run without it.
    in_main_thread = threading.current_thread() is threading.main_thread()
    timeout = MATH_VERIFY_TIMEOUT_S if in_main_thread else None
    gold_parsed = _parse_math(gold, timeout)
    if gold_parsed is None:
        return False
    pred_parsed = _parse_math(prediction, timeout)
    if pred_parsed is None:
        return False
    # verify is not symmetric: the ground truth goes first.
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))


def accuracy_reward(completions: Sequence[str], *, answer: Sequence[Any], **_: Any) -> list[float]:
    r"""1.0 where the last ``\boxed{}`` of a response is a correct ``answer``, else 0.0.

    Graded by :func:`is_equivalent` (math-verify, with exact match for words and letters);
    a response without a closed ``\boxed{}`` scores 0. Safe to call from any thread.
    """
    scores = []
    for text, truth in zip(completions, answer, strict=True):
        boxed = extract_boxed(text)
        scores.append(float(boxed is not None and is_equivalent(boxed, str(truth))))
    return scores


def exact_match_reward(
    completions: Sequence[str], *, answer: Sequence[Any], **_: Any
) -> list[float]:
    r"""1.0 where the last ``\boxed{}`` of a response equals ``answer`` after
    :func:`normalize_answer` (trimmed, lower case, spaces removed), else 0.0.

    The grader of the synthetic task (short words and integers), under which its published
    figures were measured. :func:`accuracy_reward` is more lenient: of 2048 responses the embedded
    model samples, it grades one differently (``\boxed{total. So 01}`` counts as ``1``).
    """
    scores = []
    for text, truth in zip(completions, answer, strict=True):
        boxed = extract_boxed(text)
        scores.append(
            float(boxed is not None and normalize_answer(boxed) == normalize_answer(str(truth)))
        )
    return scores


def format_reward(completions: Sequence[str], **_: Any) -> list[float]:
    r"""1.0 where the whole response matches ``<think>.*</think>.*\boxed{.*}.*``, else 0.0."""
    return [float(_FORMAT.match(text.strip()) is not None) for text in completions]


class RewardFailure(RuntimeError):
    """A reward term failed on every response for ``stop_after`` scoring calls in a row."""


class WeightedReward:
    """A weighted sum of named reward terms; every term is kept for logging.

    A term that raises on the batch is called again once per response: the responses whose call
    raises score 0 for that term. A NaN or infinite (or non-numeric) score is also replaced by 0.
    Either way the response is counted in :attr:`last_errors` (the last call) and
    :attr:`total_errors` (all calls), and the first failure of each kind per term is warned about.
    Returning the wrong number of scores is a programming error and raises ``ValueError``.

    Args:
        functions: Name -> reward callable ``f(completions, **columns) -> list[float]``. Give a
            dotted import path in YAML, e.g. ``accuracy: cppo_lightning.rewards.accuracy_reward``.
        weights: Name -> weight of that term in the total. Every name of ``functions`` needs one.
        stop_after: A term that fails on every response of this many scoring calls in a row (one
            call per rollout batch, and per held-out batch in validation) raises
            :class:`RewardFailure` with its first error, which stops the run after a checkpoint
            is saved. None never stops.
    """

    def __init__(
        self,
        functions: dict[str, RewardFunction] | None = None,
        weights: dict[str, float] | None = None,
        stop_after: int | None = 3,
    ) -> None:
        if stop_after is not None and stop_after < 1:
            raise ValueError(
                f"reward.stop_after must be >= 1 (or null never to stop), got {stop_after}."
            )
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
        #: Term name -> responses of the last call scored 0 because the term raised or gave NaN/inf.
        self.last_errors: dict[str, int] = dict.fromkeys(self.functions, 0)
        #: The same, summed over every call.
        self.total_errors: dict[str, int] = dict.fromkeys(self.functions, 0)
        self._warned: set[tuple[str, str]] = set()
        self.stop_after = stop_after
        #: Term name -> the first failure it had (what raised, or the non-finite value).
        self.first_errors: dict[str, str] = {}
        #: Term name -> scoring calls in a row on which it failed on every response.
        self.failed_calls: dict[str, int] = dict.fromkeys(self.functions, 0)

    def _warn_once(self, name: str, kind: str, detail: str) -> None:
        self.first_errors.setdefault(name, detail)
        if (name, kind) in self._warned:
            return
        self._warned.add((name, kind))
        warnings.warn(
            f"reward term {name!r} {detail}; the responses concerned score 0 for this term "
            "(counted in WeightedReward.last_errors/total_errors; warned once per term).",
            RuntimeWarning,
            stacklevel=3,
        )

    def _scores(
        self, name: str, fn: RewardFunction, completions: Sequence[str], columns: Mapping
    ) -> tuple[list[Any], int]:
        """The term's raw scores, calling per response if the batch call raises; and #errors."""
        try:
            values = list(fn(completions, **columns))
        except Exception as exc:
            self._warn_once(name, "raised", f"raised {type(exc).__name__}: {exc}")
        else:
            if len(values) != len(completions):
                raise ValueError(
                    f"reward function {name!r} returned {len(values)} scores for "
                    f"{len(completions)} responses: it must return one float per response."
                )
            return values, 0
        # Isolate the failing responses.
        values, errors = [], 0
        for i, completion in enumerate(completions):
            try:
                single = list(fn([completion], **{k: [v[i]] for k, v in columns.items()}))
            except Exception as exc:
                self._warn_once(name, "raised", f"raised {type(exc).__name__}: {exc}")
                values.append(0.0)
                errors += 1
                continue
            if len(single) != 1:
                raise ValueError(
                    f"reward function {name!r} returned {len(single)} scores for 1 response: "
                    "it must return one float per response."
                )
            values.append(single[0])
        return values, errors

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
            raw, errors = self._scores(name, fn, completions, columns)
            values = []
            for value in raw:
                try:
                    number = float(value)
                except (TypeError, ValueError):
                    number = math.nan
                if not math.isfinite(number):
                    self._warn_once(name, "non-finite", f"returned a non-finite score {value!r}")
                    number = 0.0
                    errors += 1
                values.append(number)
            terms[name] = torch.tensor(values, dtype=torch.float32)
            self.last_errors[name] = errors
            self.total_errors[name] += errors
            failed_all = bool(completions) and errors >= len(completions)
            self.failed_calls[name] = self.failed_calls[name] + 1 if failed_all else 0
            if self.stop_after is not None and self.failed_calls[name] >= self.stop_after:
                raise RewardFailure(
                    f"reward term {name!r} failed on every response of {self.failed_calls[name]} "
                    f"rollout batches in a row (reward.stop_after={self.stop_after}); its first "
                    f"error: {self.first_errors.get(name, 'unknown')}. Fix the reward function "
                    "(or its column mapping) and resume from the saved checkpoint."
                )
        total = sum(self.weights[name] * value for name, value in terms.items())
        assert isinstance(total, torch.Tensor)
        return total, terms
