"""The LightningDataModule: prompts with their images, collated by the policy's processor.

A batch is B prompts (a :class:`~cppo_lightning.records.PromptBatch`); the rollout expands each
into G responses, so a GRPO group never straddles batches or ranks. Before training, every row of
both splits is checked once (images decode, image count, prompt length) and unusable rows are
dropped and counted (``data_report.json`` in the log directory).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Collection, Sequence
from typing import Any, Protocol

import datasets
import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from cppo_lightning.data.loader import ResumableLoader, ShuffledSampler
from cppo_lightning.data.rows import (
    DropReport,
    decode_bound,
    drop_reason,
    empty,
    format_prompt,
    image_tensor,
    prepare_split,
    row_images,
    undecoded_images,
)
from cppo_lightning.data.synthetic import INSTRUCTION, SyntheticShapes
from cppo_lightning.data.views import ViewMaker
from cppo_lightning.families import Family, family_of_processor
from cppo_lightning.perturbations import view_seed
from cppo_lightning.policy import DEFAULT_MODEL, load_processor, model_family
from cppo_lightning.records import PromptBatch

__all__ = ["DatasetSource", "PromptCollator", "VisionLanguageDataModule", "format_prompt"]

# Column names recognised when the DataModule's *_column arguments are left at None.
QUESTION_COLUMNS = ("question", "problem", "query", "prompt")
ANSWER_COLUMNS = ("answer", "solution", "ground_truth", "gt_answer")
IMAGE_COLUMNS = ("image", "images", "decoded_image")


class DatasetSource(Protocol):
    """Anything with ``load() -> DatasetDict`` holding a ``train`` and a ``validation`` split."""

    def load(self) -> datasets.DatasetDict: ...


ROW_INDEX = "__row_index__"
SPLITS = ("train", "validation")


class _IndexedRows(Dataset):
    """A split whose rows also carry their index (it seeds the row's image views)."""

    def __init__(self, split: datasets.Dataset) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.split[index], ROW_INDEX: index}


class PromptCollator:
    """Turns dataset rows into a :class:`PromptBatch` with the processor (left padding).

    Rows have the canonical columns ``question``, ``answer`` and ``image_column`` (one image or
    a list). With ``keep_images`` the batch also carries the images as float tensors in [0, 1],
    from which the DataModule draws the perturbed views on the batch's device. A row whose
    image cannot be read (a file that vanished since the check) is skipped with a warning and
    counted in ``skipped``.

    Args:
        processor: The policy's processor.
        instruction: Text appended to every question.
        image_column: Column holding the image(s).
        keep_images: Keep the decoded images (for views).
        family: The model family; found from the processor's class when None.
        min_pixels: Images smaller than this (H x W) are upscaled to it, aspect kept.
        max_pixels: Images larger than this are downscaled to it, aspect kept. With the
            processor's own budget it also bounds how large an image is decoded
            (:class:`~cppo_lightning.data.rows.DecodeBound`).
    """

    def __init__(
        self,
        processor: Any,
        instruction: str,
        image_column: str = "image",
        keep_images: bool = False,
        family: Family | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
    ) -> None:
        self.processor = processor
        self.instruction = instruction
        self.image_column = image_column
        self.keep_images = keep_images
        self.family = family if family is not None else family_of_processor(processor)
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.bound = decode_bound(max_pixels, getattr(processor, "image_processor", None))
        self.skipped = 0

    def images(self, row: dict[str, Any]) -> list[Image.Image]:
        """The row's images, decoded and sized (ValueError if one is bad or missing)."""
        return row_images(row, self.image_column, self.min_pixels, self.max_pixels, self.bound)

    def prompt(self, row: dict[str, Any], num_images: int) -> str:
        return format_prompt(self.processor, row["question"], self.instruction, num_images)

    def prompt_length(self, row: dict[str, Any], images: list[Image.Image] | None = None) -> int:
        """Tokens of the row's prompt, image tokens included (``images``: the row's, decoded)."""
        images = self.images(row) if images is None else images
        encoded = self.processor(
            text=[self.prompt(row, len(images))],
            images=[images] if self.family.nested_images else images,
            return_tensors="pt",
        )
        return int(encoded["input_ids"].shape[1])

    def __call__(self, rows: Sequence[dict[str, Any]]) -> PromptBatch:
        kept: list[dict[str, Any]] = []
        per_row: list[list[Image.Image]] = []
        for row in rows:
            try:
                per_row.append(self.images(row))
            except ValueError as error:
                self.skipped += 1
                warnings.warn(
                    f"skipped row {row.get(ROW_INDEX)}: {error} ({self.skipped} so far)",
                    stacklevel=2,
                )
                continue
            kept.append(row)
        if not kept:
            raise RuntimeError(
                f"no row of this batch of {len(rows)} has a readable image: the image files "
                "changed since the data were checked at set-up; fix them and restart."
            )
        row_index = torch.tensor([row.get(ROW_INDEX, -1) for row in kept], dtype=torch.long)
        kept = [{k: v for k, v in row.items() if k != ROW_INDEX} for row in kept]
        texts = [self.prompt(row, len(images)) for row, images in zip(kept, per_row, strict=True)]
        flat = [image for images in per_row for image in images]
        encoded = self.processor(
            text=texts,
            images=per_row if self.family.nested_images else flat,
            padding=True,
            padding_side="left",
            return_tensors="pt",
        )
        columns = {
            name: [row[name] for row in kept] for name in kept[0] if name != self.image_column
        }
        return PromptBatch(
            input_ids=encoded["input_ids"],
            attention_mask=encoded["attention_mask"],
            vision={key: encoded[key] for key in self.family.image_keys},
            vision_layout=dict(self.family.image_keys),
            image_counts=torch.tensor([len(images) for images in per_row], dtype=torch.long),
            mm_token_type_ids=encoded.get("mm_token_type_ids"),
            columns=columns,
            row_index=row_index,
            images=[image_tensor(image) for image in flat] if self.keep_images else None,
        )


def _pick_column(
    dataset: datasets.Dataset, split: str, given: str | None, candidates: Sequence[str], what: str
) -> str:
    if given is not None:
        if given not in dataset.column_names:
            raise ValueError(
                f"the {split!r} split has no column(s) {[given]} (columns: "
                f"{dataset.column_names}): set data.{what}_column (or the dataset spec's "
                "`columns`) to match it."
            )
        return given
    for name in candidates:
        if name in dataset.column_names:
            return name
    raise ValueError(
        f"the {split!r} split has none of the usual {what} columns {list(candidates)} (columns: "
        f"{dataset.column_names}): set data.{what}_column."
    )


class VisionLanguageDataModule(pl.LightningDataModule):
    """Prompts with their images: the train split feeds rollouts, validation held-out accuracy.

    Args:
        dataset: Where rows come from: any object with ``load() -> DatasetDict`` (``train`` and
            ``validation`` splits), e.g. :class:`~cppo_lightning.data.HFDataset` for hub or
            local files. The synthetic shapes task when None.
        processor_name_or_path: Checkpoint whose processor encodes prompts. Linked from
            ``model.model_name_or_path``.
        batch_size: B, prompts per rollout batch (per device); each gets G responses.
        val_batch_size: Prompts per validation batch.
        num_workers: DataLoader worker processes.
        instruction: Text appended to every question (the response format the reward checks;
            :data:`cppo_lightning.data.PAPER_INSTRUCTION` is the paper's).
        question_column: Dataset column holding the question; found among ``question``,
            ``problem``, ``query``, ``prompt`` when None.
        answer_column: Column holding the ground truth; ``answer``, ``solution``,
            ``ground_truth``, ``gt_answer`` when None.
        image_column: Column holding the image or list of images; ``image``, ``images``,
            ``decoded_image`` when None.
        min_pixels: Smaller images (H x W) are upscaled to this many pixels; None leaves them.
        max_pixels: Larger images are downscaled to this many pixels; None leaves them.
        max_prompt_length: Rows whose prompt (image tokens included) is longer are dropped and
            counted; None keeps all (and skips the tokenisation pass).
        max_images: Rows with more images are dropped and counted (1 = single-image items, as the
            paper trains on ViRL39K); None allows as many as the model family takes.
        preprocess_workers: Processes for the set-up pass that checks every row.
        preserving_view: Information-preserving perturbation I+ (any module mapping float
            images ``[B, 3, H, W]`` -> ``[B, 3, H, W]``, e.g. the kornia augmentations and the
            containers in :mod:`cppo_lightning.perturbations`); None draws no such view.
        removing_view: Information-removing perturbation I- (CPPO's negative, PAPO's masked
            image); None draws no such view.
        view_seed: Base seed of the views; each prompt's views are drawn from (view_seed, row,
            epoch), on the batch's device, independently of the training RNG. Also seeds the
            extra prompts a rollout filter asks for (:meth:`extra_prompts`).
    """

    def __init__(
        self,
        dataset: DatasetSource | None = None,
        processor_name_or_path: str = DEFAULT_MODEL,
        batch_size: int = 8,
        val_batch_size: int = 32,
        num_workers: int = 0,
        instruction: str = INSTRUCTION,
        question_column: str | None = None,
        answer_column: str | None = None,
        image_column: str | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        max_prompt_length: int | None = None,
        max_images: int | None = None,
        preprocess_workers: int = 1,
        preserving_view: torch.nn.Module | None = None,
        removing_view: torch.nn.Module | None = None,
        view_seed: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1 or val_batch_size < 1:
            raise ValueError(
                f"data.batch_size and data.val_batch_size must be >= 1, got {batch_size} and "
                f"{val_batch_size}."
            )
        if min_pixels is not None and max_pixels is not None and min_pixels > max_pixels:
            raise ValueError(
                f"data.min_pixels={min_pixels} is larger than data.max_pixels={max_pixels}."
            )
        if max_images is not None and max_images < 1:
            raise ValueError(f"data.max_images must be >= 1 or null, got {max_images}.")
        self.source = dataset if dataset is not None else SyntheticShapes()
        self.processor_name_or_path = processor_name_or_path
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.num_workers = num_workers
        self.instruction = instruction
        self.question_column = question_column
        self.answer_column = answer_column
        self.image_column = image_column
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.max_prompt_length = max_prompt_length
        self.max_images = max_images
        self.preprocess_workers = preprocess_workers
        self.preserving_view = preserving_view
        self.removing_view = removing_view
        self.view_seed = view_seed
        self.splits: dict[str, datasets.Dataset] = {}
        self.reports: dict[str, DropReport] = {}
        self.collate: PromptCollator | None = None
        self.val_collate: PromptCollator | None = None
        self.view_maker: ViewMaker | None = None

    @property
    def view_names(self) -> tuple[str, ...]:
        """The views that training batches carry (``preserving``, ``removing``)."""
        views = {"preserving": self.preserving_view, "removing": self.removing_view}
        return tuple(name for name, view in views.items() if view is not None)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        processor, family = self._processor()
        loaded = self.source.load()
        if any(split not in loaded for split in SPLITS):
            raise ValueError(
                f"data.dataset returned splits {list(loaded)}; it needs 'train' and 'validation'."
            )
        for split in SPLITS:
            ds, report = self._check_split(loaded[split], split, processor, family)
            if len(ds) == 0:
                raise ValueError(
                    f"every row of the {split!r} split was dropped ({report.summary()}): "
                    "check the column mapping, image paths (image_root), data.max_prompt_length "
                    "and data.max_images."
                )
            if split == "train" and stage in (None, "fit"):
                self._check_full_batch(len(ds), report)
            rank_zero_info(f"data {report.summary()}")
            self.splits[split], self.reports[split] = ds, report
        self._write_report()
        self.view_maker = ViewMaker(
            processor.image_processor,
            self.preserving_view,
            self.removing_view,
            self.view_seed,
            family=family,
        )
        self.collate = self._collator(processor, family, keep_images=self.view_maker.enabled)
        # Held-out batches never get views: no need to carry their images as tensors.
        self.val_collate = self._collator(processor, family)

    def prepare_data(self) -> None:
        # Once per node, before setup on every rank: run the row check of file and hub datasets
        # so that the ranks' setup reads its cached result instead of each checking every row.
        loaded = self.source.load()
        if not all(split in loaded and loaded[split].cache_files for split in SPLITS):
            return  # in-memory data (the synthetic task): nothing to cache, setup checks it
        processor, family = self._processor()
        for split in SPLITS:
            self._check_split(loaded[split], split, processor, family)

    def _processor(self) -> tuple[Any, Family]:
        return load_processor(self.processor_name_or_path), model_family(
            self.processor_name_or_path
        )

    def _collator(
        self, processor: Any, family: Family, keep_images: bool = False
    ) -> PromptCollator:
        return PromptCollator(
            processor,
            self.instruction,
            "image",
            keep_images=keep_images,
            family=family,
            min_pixels=self.min_pixels,
            max_pixels=self.max_pixels,
        )

    def _check_split(
        self, ds: datasets.Dataset, split: str, processor: Any, family: Family
    ) -> tuple[datasets.Dataset, DropReport]:
        """Canonical columns, then the row check (cached for file and hub datasets)."""
        return prepare_split(
            self._canonical(ds, split),
            split,
            self._row_check(self._collator(processor, family), family),
            self.preprocess_workers,
            settings=self._check_settings(split, processor),
        )

    def _check_settings(self, split: str, processor: Any) -> tuple[Any, ...]:
        """Everything the row check of ``split`` depends on (its cache key, with the data)."""
        tokenizer = processor.tokenizer
        return (
            split,
            type(processor).__name__,
            processor.image_processor.to_json_string(),
            tokenizer.name_or_path,
            len(tokenizer),
            getattr(processor, "chat_template", None),
            self.instruction,
            self.min_pixels,
            self.max_pixels,
            self.max_prompt_length,
            self.max_images,
            (self.question_column, self.answer_column, self.image_column),
        )

    def _canonical(self, ds: datasets.Dataset, split: str) -> datasets.Dataset:
        """Rename the question/answer/image columns to ``question``/``answer``/``image``."""
        names = {
            "question": _pick_column(ds, split, self.question_column, QUESTION_COLUMNS, "question"),
            "answer": _pick_column(ds, split, self.answer_column, ANSWER_COLUMNS, "answer"),
            "image": _pick_column(ds, split, self.image_column, IMAGE_COLUMNS, "image"),
        }
        renames = {source: ours for ours, source in names.items() if source != ours}
        # A column already named like a target (e.g. a reference `solution` when the answer
        # column is `solution`) would collide: keep it under another name.
        clashes = {ours: f"original_{ours}" for ours in renames.values() if ours in ds.column_names}
        ds = ds.rename_columns({**clashes, **renames})
        return undecoded_images(ds, "image")

    def _row_check(self, collator: PromptCollator, family: Family) -> Any:
        max_images = self.max_images
        max_length = self.max_prompt_length

        def check(row: dict[str, Any]) -> str | tuple[str, str | None] | None:
            if empty(row["question"]):
                return "empty question"
            if empty(row["answer"]):
                return "empty answer"
            try:
                images = collator.images(row)
            except ValueError as error:
                return drop_reason(error)
            if len(images) > 1 and not family.multi_image:
                return f"multi-image row ({family.name} takes one image per prompt)"
            if max_images is not None and len(images) > max_images:
                return f"more than {max_images} image(s) (data.max_images)"
            if max_length is not None and collator.prompt_length(row, images) > max_length:
                return f"prompt longer than {max_length} tokens (data.max_prompt_length)"
            return None

        return check

    def _write_report(self) -> None:
        trainer = self.trainer
        directory = trainer.log_dir if trainer is not None else None
        if trainer is None or directory is None or not trainer.is_global_zero:
            return
        os.makedirs(directory, exist_ok=True)
        report = {
            split: {"rows": r.rows, "kept": r.kept, "dropped": dict(r), "examples": r.examples}
            for split, r in self.reports.items()
        }
        with open(os.path.join(directory, "data_report.json"), "w") as handle:
            json.dump(report, handle, indent=2)

    def _check_full_batch(self, usable: int, report: DropReport) -> None:
        """Training takes full batches only (``drop_last``): fewer usable rows than one batch on
        every rank would train zero steps without a word, so it is refused here."""
        trainer = self.trainer
        world = int(getattr(trainer, "world_size", 1) or 1) if trainer is not None else 1
        if usable < self.batch_size * world:
            raise ValueError(
                f"the 'train' split has {usable} usable row(s) ({report.summary()}), fewer than "
                f"one full batch: data.batch_size {self.batch_size}"
                + (f" x {world} processes" if world > 1 else "")
                + ". Lower data.batch_size or give more rows."
            )

    def train_dataloader(self) -> DataLoader:
        assert self.collate is not None, "setup() has not run"
        # Resumable: a checkpoint holds the pass's order and the batches the trainer took.
        rows = _IndexedRows(self.splits["train"])
        return ResumableLoader(
            rows,
            batch_size=self.batch_size,
            sampler=ShuffledSampler(rows),
            # Full batches only, so mini-batch splits and group statistics are stable.
            drop_last=True,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            taken=self._batches_taken,
        )

    def _batches_taken(self) -> int:
        """Training batches of the current pass whose step has run."""
        trainer = self.trainer
        if trainer is None:
            return 0
        return int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)  # type: ignore[attr-defined]

    def val_dataloader(self) -> DataLoader:
        assert self.val_collate is not None, "setup() has not run"
        return DataLoader(
            _IndexedRows(self.splits["validation"]),
            batch_size=self.val_batch_size,
            collate_fn=self.val_collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Views are drawn here, on the device the batch now lives on, for training batches only.
        trainer = self.trainer
        if (
            isinstance(batch, PromptBatch)
            and batch.images is not None
            and self.view_maker is not None
            and self.view_maker.enabled  # images carried for a rollout view only: no views
            and trainer is not None
            and trainer.training
        ):
            return self.view_maker(batch, trainer.current_epoch)
        return batch

    # ------------------------------------------------------------------ rollout seams
    def carry_images(self) -> None:
        """Training batches carry their images as tensors in [0, 1] (``PromptBatch.images``),
        with or without views: a ``rollout.view`` draws the images it generates from from them."""
        assert self.collate is not None, "setup() has not run"
        self.collate.keep_images = True

    def extra_prompts(self, step: int, round: int, exclude: Collection[int] = ()) -> PromptBatch:
        """``data.batch_size`` more training prompts, for a ``rollout.filter``'s extra generation
        round: collated, on the device and with views, as the training batches are.

        The rows are the first of a permutation of the train split seeded by ``(view_seed,
        step, round, rank)``, leaving out ``exclude`` (the rows this step already generated for)
        while others remain, so a resumed run draws the same prompts and the training RNG is
        untouched. They are drawn beside the epoch's order, which they do not change: a prompt
        may come up again in a later batch of the epoch.

        Args:
            step: The trainer's ``global_step``.
            round: The generation round (1 = the first extra round).
            exclude: Dataset rows not to draw.
        """
        assert self.collate is not None, "setup() has not run"
        trainer = self.trainer
        rank = int(trainer.global_rank) if trainer is not None else 0
        generator = torch.Generator()
        generator.manual_seed(view_seed(self.view_seed, step, round, f"extra-prompts#{rank}"))
        order = torch.randperm(len(self.splits["train"]), generator=generator).tolist()
        excluded = set(exclude)
        fresh = [row for row in order if row not in excluded]
        picked = (fresh + [row for row in order if row in excluded])[: self.batch_size]
        rows = _IndexedRows(self.splits["train"])
        batch = self.collate([rows[row] for row in picked])
        if trainer is not None:
            return trainer.strategy.batch_to_device(batch)  # the transfer hooks draw the views
        maker = self.view_maker  # outside a fit (tests): on the host, views of epoch 0
        return maker(batch, 0) if maker is not None and maker.enabled and batch.images else batch

    def encode_view(
        self, images: Sequence[torch.Tensor], prompts: PromptBatch
    ) -> dict[str, torch.Tensor]:
        """The processor's image tensors of ``images`` (``[3, H, W]`` in [0, 1], one per image
        of ``prompts``, e.g. a ``rollout.view``'s), made as the views' are, on the device and in
        the dtype of ``prompts.vision``.

        Raises:
            ValueError: If an image's H x W differs from its original's (the prompt tokens
                could not be reused).
        """
        assert self.view_maker is not None, "setup() has not run"
        return self.view_maker.encode(images, prompts, "rollout.view")
