"""The LightningDataModule: prompts with their images, collated by the policy's processor.

A batch is B prompts (a :class:`~cppo_lightning.records.PromptBatch`); the rollout expands each
into G responses, so a GRPO group never straddles batches or ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import datasets
import lightning.pytorch as pl
from PIL import Image
from torch.utils.data import DataLoader

from cppo_lightning.data.synthetic import INSTRUCTION, SyntheticShapes
from cppo_lightning.policy import DEFAULT_MODEL, load_processor
from cppo_lightning.records import PromptBatch


class DatasetSource(Protocol):
    """Anything with ``load() -> DatasetDict`` holding a ``train`` and a ``validation`` split."""

    def load(self) -> datasets.DatasetDict: ...


def format_prompt(processor: Any, question: str, instruction: str = "") -> str:
    """The chat-formatted prompt text (one image, then the question and the instruction)."""
    text = f"{question} {instruction}".strip()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


class PromptCollator:
    """Turns dataset rows into a :class:`PromptBatch` with the processor (left padding)."""

    def __init__(self, processor: Any, instruction: str, image_column: str = "image") -> None:
        self.processor = processor
        self.instruction = instruction
        self.image_column = image_column

    def __call__(self, rows: Sequence[dict[str, Any]]) -> PromptBatch:
        images = [_rgb(row[self.image_column]) for row in rows]
        texts = [format_prompt(self.processor, row["question"], self.instruction) for row in rows]
        encoded = self.processor(
            text=texts, images=images, padding=True, padding_side="left", return_tensors="pt"
        )
        columns = {
            name: [row[name] for row in rows] for name in rows[0] if name != self.image_column
        }
        return PromptBatch(
            input_ids=encoded["input_ids"],
            attention_mask=encoded["attention_mask"],
            pixel_values=encoded["pixel_values"],
            image_grid_thw=encoded["image_grid_thw"],
            mm_token_type_ids=encoded.get("mm_token_type_ids"),
            columns=columns,
        )


def _rgb(image: Any) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image in the image column, got {type(image).__name__}.")
    return image if image.mode == "RGB" else image.convert("RGB")


def check_rows(
    dataset: datasets.Dataset, split: str, image_column: str, required: Sequence[str]
) -> None:
    """Fail early, naming the row, if a row has no image or an empty required column."""
    for column in (image_column, *required):
        if column not in dataset.column_names:
            raise ValueError(
                f"the {split!r} split has no column {column!r} (columns: {dataset.column_names}): "
                "set data.question_column / data.answer_column / data.image_column to match it."
            )
    images = dataset.cast_column(image_column, datasets.Image(decode=False))[image_column]
    for index, image in enumerate(images):
        if image is None or (
            isinstance(image, dict) and not (image.get("bytes") or image.get("path"))
        ):
            raise ValueError(
                f"row {index} of the {split!r} split has no image in column {image_column!r}: "
                "every prompt needs an image; drop or fix that row."
            )
    for column in required:
        for index, value in enumerate(dataset[column]):
            if value is None or (isinstance(value, str) and not value.strip()):
                raise ValueError(
                    f"row {index} of the {split!r} split has an empty {column!r}: "
                    "drop or fix that row, or point the column mapping at another column."
                )


class VisionLanguageDataModule(pl.LightningDataModule):
    """Prompts with their images: the train split feeds rollouts, validation held-out accuracy.

    Args:
        dataset: Where rows come from: any object with ``load() -> DatasetDict`` (``train`` and
            ``validation`` splits). The synthetic shapes task when None.
        processor_name_or_path: Checkpoint whose processor encodes prompts. Linked from
            ``model.model_name_or_path``.
        batch_size: B, prompts per rollout batch (per device); each gets G responses.
        val_batch_size: Prompts per validation batch.
        num_workers: DataLoader worker processes.
        instruction: Text appended to every question (the response format the reward checks).
        question_column: Dataset column holding the question.
        answer_column: Dataset column holding the ground-truth answer.
        image_column: Dataset column holding the image.
    """

    def __init__(
        self,
        dataset: DatasetSource | None = None,
        processor_name_or_path: str = DEFAULT_MODEL,
        batch_size: int = 8,
        val_batch_size: int = 32,
        num_workers: int = 0,
        instruction: str = INSTRUCTION,
        question_column: str = "question",
        answer_column: str = "answer",
        image_column: str = "image",
    ) -> None:
        super().__init__()
        if batch_size < 1 or val_batch_size < 1:
            raise ValueError(
                f"data.batch_size and data.val_batch_size must be >= 1, got {batch_size} and "
                f"{val_batch_size}."
            )
        self.source = dataset if dataset is not None else SyntheticShapes()
        self.processor_name_or_path = processor_name_or_path
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.num_workers = num_workers
        self.instruction = instruction
        self.question_column = question_column
        self.answer_column = answer_column
        self.image_column = image_column
        self.splits: dict[str, datasets.Dataset] = {}
        self.collate: PromptCollator | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        loaded = self.source.load()
        for split in ("train", "validation"):
            if split not in loaded:
                raise ValueError(
                    f"data.dataset returned splits {list(loaded)}; "
                    "it needs 'train' and 'validation'."
                )
            ds = loaded[split]
            check_rows(ds, split, self.image_column, (self.question_column, self.answer_column))
            renames = {self.question_column: "question", self.answer_column: "answer"}
            self.splits[split] = ds.rename_columns({k: v for k, v in renames.items() if k != v})
        self.collate = PromptCollator(
            load_processor(self.processor_name_or_path), self.instruction, self.image_column
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", self.val_batch_size, shuffle=False)

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        assert self.collate is not None, "setup() has not run"
        return DataLoader(
            self.splits[split],  # type: ignore[arg-type]
            batch_size=batch_size,
            shuffle=shuffle,
            # Full batches only in training, so mini-batch splits and group statistics are stable.
            drop_last=shuffle,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
