r"""Evaluation sets: one benchmark's rows, mapped to a prompt, an image and a gradable answer.

A set is described in YAML (``configs/eval/<benchmark>.yaml``) by the constructor arguments of
:class:`EvalSet`; ``cppo evaluate --eval`` also takes a :class:`~cppo_lightning.data.DatasetSpec`
inline (``--eval '{path: my.jsonl, split: train}'``), with any :class:`EvalSet` key beside it.

:meth:`EvalSet.load` reads the rows and turns each into the canonical columns ``prompt_id``,
``question`` (multiple-choice options appended as lettered lines), ``answer`` (a letter for
multiple choice), ``options``, ``category`` and ``image``; rows that cannot be scored (no image, an
image that does not decode, an answer that is not among the options, a prompt over
``max_prompt_length``) are dropped and counted by reason, as training's row check does.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import yaml

from cppo_lightning.data.datamodule import DatasetSource, PromptCollator
from cppo_lightning.data.hf import DatasetSpec
from cppo_lightning.data.rows import (
    PAPER_INSTRUCTION,
    DecodeBound,
    DropReport,
    decode_bound,
    drop_reason,
    empty,
    image_values,
    prepare_split,
    sized_images,
    undecoded_images,
)
from cppo_lightning.rewards import accuracy_reward

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
#: How multiple-choice options are shown after the question (the MathVista query's layout).
OPTIONS_HEADER = "Choices:"
# "A. foo; B. bar", "(A) foo (B) bar", "A: foo\nB: bar": a letter that starts an option.
_OPTION_START = re.compile(r"(?:^|(?<=[\s;,]))\(?([A-Z])\s*[.):：]\s*")

CHECKOUT = Path(__file__).resolve().parents[3]
"""The checkout this package is installed from (``configs/`` lies there in an editable install)."""


def parse_options(value: Any) -> list[str]:
    """Multiple-choice options from a dataset cell: a list, a Python/JSON list written as a
    string (``"['3', '4']"``, MMMU-Pro), or lettered text (``"A. 3; B. 4"``, WeMath). Empty
    for free-form items (None, ``[]``, ``""``)."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    text = str(value).strip()
    if not text:
        return []
    if text[0] == "[":
        try:
            parsed = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            parsed = None
        if isinstance(parsed, (list, tuple)):
            return [str(v).strip() for v in parsed if str(v).strip()]
    starts = list(_OPTION_START.finditer(text))
    letters = [m.group(1) for m in starts]
    if not starts or letters != list(LETTERS[: len(letters)]):
        raise ValueError(f"cannot read the options {text[:80]!r} (expected 'A. ...; B. ...')")
    pieces = []
    for i, match in enumerate(starts):
        end = starts[i + 1].start() if i + 1 < len(starts) else len(text)
        pieces.append(text[match.end() : end].strip().rstrip(";,").strip())
    return pieces


def option_letter(answer: str, options: list[str]) -> str:
    """The letter of ``answer`` among ``options``: ``answer`` may be the letter itself (``B``,
    ``(B)``) or the option's text. Raises ValueError when it is neither."""
    text = answer.strip()
    bare = text.strip("()").rstrip(".").strip()
    if len(bare) == 1 and bare.upper() in LETTERS[: len(options)]:
        return bare.upper()
    for i, option in enumerate(options):
        if option.strip().lower() == text.lower():
            return LETTERS[i]
    raise ValueError("answer not among the options")


def with_options(question: str, options: list[str]) -> str:
    """The question followed by its lettered options, one per line."""
    lines = [f"({LETTERS[i]}) {option}" for i, option in enumerate(options)]
    return "\n".join([question.rstrip(), OPTIONS_HEADER, *lines])


def _cell(row: dict[str, Any], column: str) -> Any:
    """``row[column]``; ``a.b`` reads key ``b`` of a dict column ``a`` (MathVista's
    ``metadata.category``)."""
    value: Any = row
    for part in column.split("."):
        try:
            value = value[part]
        except (KeyError, TypeError, IndexError):
            return None
    return value


class EvalSet:
    """One benchmark (or any local file) as an evaluation set.

    Args:
        name: Short name; the results' ``benchmark`` and the TensorBoard tag
            ``eval/<name>/<images>/accuracy``.
        dataset: Where the rows come from: a :class:`~cppo_lightning.data.DatasetSpec` (hub name
            or local files), or any source with ``load() -> DatasetDict`` (e.g. the synthetic task)
            whose ``split`` is read.
        split: Split of a ``load() -> DatasetDict`` source (ignored for a ``DatasetSpec``, which
            names its own).
        question_column: Column with the question text; None for sets whose question is in
            the image (MMMU-Pro vision): ``question_template`` is then the whole question.
        answer_column: Column with the ground truth (a letter or an option's text for
            multiple-choice items).
        image_column: Column with the image or list of images (``datasets`` images, bytes/path
            dicts, or paths relative to the spec's ``image_root``).
        options_column: Column with the multiple-choice options (a list, a list written as a
            string, or ``A. ...; B. ...`` text); rows whose cell is empty are free-form. None when
            options are part of the question text (or the set has none).
        category_column: Column to break accuracy down by (``a.b`` reads key ``b`` of a dict
            column); None for no breakdown.
        id_column: Column with a unique row id (the JSONL's ``prompt_id``); the row's position
            when None.
        question_template: The question shown, with ``{question}`` standing for the question
            column's text (options are appended after it).
        instruction: Text appended to every question: the training prompt's response format.
        grader: ``f(completions, *, answer, **columns) -> list[float]`` that grades responses
            (:func:`cppo_lightning.rewards.accuracy_reward`: math-verify on the last ``\boxed{}``,
            letters and words by exact match).
        format_reward: ``f(completions, **columns) -> list[float]``: 1 for a response in the
            required format (:func:`cppo_lightning.rewards.format_reward`).
        min_pixels: Smaller images are upscaled to this many pixels (H x W); None leaves them.
        max_pixels: Larger images are downscaled to this many pixels; None leaves them.
        max_prompt_length: Rows whose prompt (image tokens included) is longer are dropped and
            counted; None keeps all.
        max_new_tokens: This set's response budget when ``--max-new-tokens`` is not given
            (None: the protocol's 2048).
        num_rows: Evaluate only the first ``num_rows`` rows (smoke runs).
    """

    def __init__(
        self,
        name: str,
        dataset: DatasetSpec | DatasetSource,
        split: str = "validation",
        question_column: str | None = "question",
        answer_column: str = "answer",
        image_column: str = "image",
        options_column: str | None = None,
        category_column: str | None = None,
        id_column: str | None = None,
        question_template: str = "{question}",
        instruction: str = PAPER_INSTRUCTION,
        grader: Callable[..., Any] = accuracy_reward,
        format_reward: Callable[..., Any] | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        max_prompt_length: int | None = None,
        max_new_tokens: int | None = None,
        num_rows: int | None = None,
    ) -> None:
        if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
            raise ValueError(
                f"eval set name {name!r}: use letters, digits, '.', '_' and '-' only (it becomes "
                "a metric key and a file-name part)."
            )
        if min_pixels is not None and max_pixels is not None and min_pixels > max_pixels:
            raise ValueError(f"min_pixels={min_pixels} is larger than max_pixels={max_pixels}.")
        if max_new_tokens is not None and max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 or null, got {max_new_tokens}.")
        if num_rows is not None and num_rows < 1:
            raise ValueError(f"num_rows must be >= 1 or null, got {num_rows}.")
        from cppo_lightning.rewards import format_reward as default_format

        self.name = name
        self.dataset = dataset
        self.split = split
        self.question_column = question_column
        self.answer_column = answer_column
        self.image_column = image_column
        self.options_column = options_column
        self.category_column = category_column
        self.id_column = id_column
        if "{question}" not in question_template and question_column is not None:
            raise ValueError(
                f"question_template {question_template!r} has no {{question}}: the question "
                f"column {question_column!r} would not be shown (or set question_column: null)."
            )
        self.question_template = question_template
        self.instruction = instruction
        self.grader = grader
        self.format_reward = format_reward if format_reward is not None else default_format
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.max_prompt_length = max_prompt_length
        self.max_new_tokens = max_new_tokens
        self.num_rows = num_rows
        self.source = "inline"  # the file it was read from, set by load_eval_set
        # How far images may shrink while decoded; load() adds the processor's budget.
        self._bound: DecodeBound = decode_bound(max_pixels)

    def fingerprint(self) -> str:
        """A hash of every setting that changes this set's prompts or grades (for resuming)."""
        settings = {
            key: (value if isinstance(value, (str, int, float, bool, type(None))) else repr(value))
            for key, value in vars(self).items()
            if key not in ("source", "dataset", "grader", "format_reward")
            and not key.startswith("_")
        }
        settings["dataset"] = _describe(self.dataset)
        settings["grader"] = _qualname(self.grader)
        settings["format_reward"] = _qualname(self.format_reward)
        text = json.dumps(settings, sort_keys=True)
        return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()

    def raw_rows(self) -> datasets.Dataset:
        if isinstance(self.dataset, DatasetSpec):
            key = "--eval's path" if self.source == "inline" else f"dataset.path in {self.source}"
            rows = self.dataset.load(key=f"eval set {self.name!r}: {key}")
        else:
            loaded = self.dataset.load()
            if self.split not in loaded:
                raise ValueError(
                    f"eval set {self.name!r}: the dataset has splits {list(loaded)}, not "
                    f"{self.split!r}: set `split`."
                )
            rows = loaded[self.split]
        if self.num_rows is not None:
            rows = rows.select(range(min(self.num_rows, len(rows))))
        return rows

    def _check_columns(self, rows: datasets.Dataset) -> None:
        wanted = {
            "question_column": self.question_column,
            "answer_column": self.answer_column,
            "image_column": self.image_column,
            "options_column": self.options_column,
            "category_column": self.category_column,
            "id_column": self.id_column,
        }
        for key, column in wanted.items():
            if column is not None and column.split(".")[0] not in rows.column_names:
                raise ValueError(
                    f"eval set {self.name!r} ({self.source}): the data have no column "
                    f"{column!r} for {key} (columns: {rows.column_names}): set {key} to one of "
                    "them."
                )

    def load(self, processor: Any) -> tuple[datasets.Dataset, DropReport]:
        """The canonical rows that can be scored, and the count of those dropped by reason.

        Raises:
            ValueError: A named column is missing (the message lists the columns there are), or
                no row is left.
        """
        self._bound = decode_bound(self.max_pixels, getattr(processor, "image_processor", None))
        rows = self.raw_rows()
        self._check_columns(rows)
        rows = undecoded_images(rows, self.image_column)
        canonical = rows.map(
            _canonical_row,
            with_indices=True,
            fn_kwargs={"columns": self._columns()},
            remove_columns=rows.column_names,
            desc=f"{self.name}: mapping columns",
        )
        collator = self.collator(processor)
        reason = canonical["__reason__"]
        report = DropReport(self.name, len(canonical))
        report.update(r for r in reason if r)
        canonical = canonical.select([i for i, r in enumerate(reason) if not r])
        checked, checked_report = prepare_split(
            canonical.remove_columns("__reason__"),
            self.name,
            _RowCheck(collator, self.max_prompt_length),
        )
        report.update(checked_report)
        ids = checked["prompt_id"]
        if len(set(ids)) != len(ids):
            duplicate = next(i for i in ids if ids.count(i) > 1)
            raise ValueError(
                f"eval set {self.name!r}: prompt id {duplicate!r} appears more than once in "
                f"column {self.id_column!r}: set id_column to a unique column (or null)."
            )
        if len(checked) == 0:
            raise ValueError(
                f"eval set {self.name!r}: every row was dropped ({report.summary()}): check the "
                "column mapping, image paths (the spec's image_root) and max_prompt_length."
            )
        return checked, report

    def _columns(self) -> dict[str, str | None]:
        return {
            "question": self.question_column,
            "answer": self.answer_column,
            "image": self.image_column,
            "options": self.options_column,
            "category": self.category_column,
            "id": self.id_column,
            "template": self.question_template,
        }

    def collator(self, processor: Any) -> PromptCollator:
        """The training collator with this set's instruction and pixel budget."""
        return PromptCollator(
            processor,
            self.instruction,
            "image",
            min_pixels=self.min_pixels,
            max_pixels=self.max_pixels,
        )

    def images(self, row: dict[str, Any]) -> list[Any]:
        """The row's images, decoded and sized as the collator decodes and sizes them (after
        :meth:`load`, bounded by the processor's budget too)."""
        return sized_images(
            image_values(row["image"]), self.min_pixels, self.max_pixels, self._bound
        )


def _canonical_row(row: dict[str, Any], index: int, columns: dict[str, str | None]) -> dict:
    """Canonical columns of one row and, in ``__reason__``, why it cannot be scored ('' if it
    can). A module-level function with keyword arguments, so that ``datasets`` caches it."""
    question = _cell(row, columns["question"]) if columns["question"] else None  # type: ignore[arg-type]
    answer = _cell(row, columns["answer"])  # type: ignore[arg-type]
    options: list[str] = []
    reason = ""
    if columns["options"] is not None:
        try:
            options = parse_options(_cell(row, columns["options"]))
        except ValueError:
            reason = "unreadable options"
    answer_text = "" if answer is None else str(answer).strip()
    if not reason and empty(answer_text):
        reason = "empty answer"
    if not reason and options:
        try:
            answer_text = option_letter(answer_text, options)
        except ValueError:
            reason = "answer not among the options"
    text = columns["template"].replace("{question}", "" if question is None else str(question))  # type: ignore[union-attr]
    if options:
        text = with_options(text, options)
    category = _cell(row, columns["category"]) if columns["category"] else None  # type: ignore[arg-type]
    prompt_id = _cell(row, columns["id"]) if columns["id"] else index  # type: ignore[arg-type]
    return {
        "prompt_id": str(prompt_id),
        "question": text,
        "answer": answer_text,
        "options": options,
        "category": "" if category is None else str(category),
        "image": _cell(row, columns["image"]),  # type: ignore[arg-type]
        "__reason__": reason,
    }


class _RowCheck:
    """Why a canonical row cannot be scored (None when it can): its images and prompt length."""

    def __init__(self, collator: PromptCollator, max_prompt_length: int | None) -> None:
        self.collator = collator
        self.max_prompt_length = max_prompt_length

    def __call__(self, row: dict[str, Any]) -> str | tuple[str, str | None] | None:
        try:
            images = self.collator.images(row)
        except ValueError as error:
            return drop_reason(error)
        if len(images) > 1 and not self.collator.family.multi_image:
            return f"multi-image row ({self.collator.family.name} takes one image per prompt)"
        limit = self.max_prompt_length
        if limit is not None and self.collator.prompt_length(row, images) > limit:
            return f"prompt longer than {limit} tokens (max_prompt_length)"
        return None


def _qualname(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', repr(fn))}"


def _describe(dataset: Any) -> str:
    if isinstance(dataset, DatasetSpec):
        return json.dumps(vars(dataset), sort_keys=True, default=str)
    public = {k: v for k, v in vars(dataset).items() if not k.startswith("_")}  # not caches
    return f"{type(dataset).__qualname__}({json.dumps(public, sort_keys=True, default=str)})"


# ---------------------------------------------------------------------------------- reading sets
_SPEC_KEYS = {
    "path",
    "split",
    "name",
    "data_files",
    "revision",
    "image_root",
    "columns",
    "num_rows",
}


def load_eval_set(value: str) -> EvalSet:
    """An :class:`EvalSet` from a YAML file (its constructor arguments), or from an inline
    mapping: a :class:`~cppo_lightning.data.DatasetSpec`'s keys (``path``, ``split``, ...) with
    any :class:`EvalSet` key beside them (``{path: q.jsonl, options_column: choices}``).

    Raises:
        ValueError: The file or mapping does not describe a set (the message says what to fix).
    """
    path = Path(value).expanduser()
    if path.suffix in (".yaml", ".yml") or path.is_file():
        # A relative path is looked up under the working directory, then under the checkout this
        # package is installed from (as cppo study looks up overlays): base.yaml's
        # configs/eval/synthetic.yaml then resolves when cppo runs from another folder.
        shipped = CHECKOUT / path
        if not path.is_file() and not path.is_absolute() and shipped.is_file():
            path = shipped
        if not path.is_file():
            raise ValueError(
                f"--eval {value!r}: no such file under the working directory ({Path.cwd()}) or "
                f"the checkout ({CHECKOUT}); give the path of a configs/eval/*.yaml file."
            )
        config = yaml.safe_load(path.read_text())
        source = str(path)
        if not isinstance(config, dict):
            raise ValueError(f"{value}: expected a mapping of EvalSet arguments, got {config!r}.")
    else:
        try:
            config = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise ValueError(
                f"--eval {value!r} is neither a file nor a YAML mapping: {error}"
            ) from None
        if not isinstance(config, dict) or "path" not in config:
            raise ValueError(
                f"--eval {value!r}: give a configs/eval/*.yaml file, or an inline dataset spec "
                "such as '{path: data/test.jsonl}'."
            )
        source = "inline"
        spec = {k: v for k, v in config.items() if k in _SPEC_KEYS}
        config = {k: v for k, v in config.items() if k not in _SPEC_KEYS}
        config["dataset"] = spec
        config.setdefault("name", re.sub(r"[^A-Za-z0-9._-]+", "_", Path(spec["path"]).stem))
    eval_set = _instantiate(config, source)
    eval_set.source = source
    return eval_set


def _instantiate(config: dict[str, Any], source: str) -> EvalSet:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(EvalSet, "set")
    try:
        parsed = parser.parse_object({"set": config})
        return parser.instantiate_classes(parsed).set
    except Exception as error:  # jsonargparse raises its own types
        raise ValueError(f"eval set {source}: {error}") from error
