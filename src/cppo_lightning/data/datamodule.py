"""The LightningDataModule: prompts with their images, collated by the policy's processor.

A batch is B prompts (a :class:`~cppo_lightning.records.PromptBatch`); the rollout expands each
into G responses, so a GRPO group never straddles batches or ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import datasets
import lightning.pytorch as pl
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from cppo_lightning.data.synthetic import INSTRUCTION, SyntheticShapes
from cppo_lightning.data.views import ViewMaker
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


ROW_INDEX = "__row_index__"


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

    With ``keep_images`` the batch also carries the images as float tensors in [0, 1], from
    which the DataModule draws the perturbed views on the batch's device.
    """

    def __init__(
        self,
        processor: Any,
        instruction: str,
        image_column: str = "image",
        keep_images: bool = False,
    ) -> None:
        self.processor = processor
        self.instruction = instruction
        self.image_column = image_column
        self.keep_images = keep_images

    def __call__(self, rows: Sequence[dict[str, Any]]) -> PromptBatch:
        row_index = torch.tensor([row.get(ROW_INDEX, -1) for row in rows], dtype=torch.long)
        rows = [{k: v for k, v in row.items() if k != ROW_INDEX} for row in rows]
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
            row_index=row_index,
            images=[_to_tensor(image) for image in images] if self.keep_images else None,
        )


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """``[3, H, W]`` float32 in [0, 1] (what the processor gives for the PIL image too)."""
    array = np.array(image, dtype=np.uint8, copy=True)  # [H, W, 3]
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)


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
        preserving_view: Information-preserving perturbation I+ (any module mapping float
            images ``[B, 3, H, W]`` -> ``[B, 3, H, W]``, e.g. the kornia augmentations and the
            containers in :mod:`cppo_lightning.perturbations`); None draws no such view.
        removing_view: Information-removing perturbation I- (CPPO's negative, PAPO's masked
            image); None draws no such view.
        view_seed: Base seed of the views; each prompt's views are drawn from (view_seed, row,
            epoch), on the batch's device, independently of the training RNG.
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
        self.source = dataset if dataset is not None else SyntheticShapes()
        self.processor_name_or_path = processor_name_or_path
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.num_workers = num_workers
        self.instruction = instruction
        self.question_column = question_column
        self.answer_column = answer_column
        self.image_column = image_column
        self.preserving_view = preserving_view
        self.removing_view = removing_view
        self.view_seed = view_seed
        self.splits: dict[str, datasets.Dataset] = {}
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
        processor = load_processor(self.processor_name_or_path)
        self.view_maker = ViewMaker(
            processor.image_processor, self.preserving_view, self.removing_view, self.view_seed
        )
        self.collate = PromptCollator(
            processor, self.instruction, self.image_column, keep_images=self.view_maker.enabled
        )
        # Held-out batches never get views: no need to carry their images as tensors.
        self.val_collate = PromptCollator(processor, self.instruction, self.image_column)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", self.val_batch_size, shuffle=False)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Views are drawn here, on the device the batch now lives on, for training batches only.
        trainer = self.trainer
        if (
            isinstance(batch, PromptBatch)
            and batch.images is not None
            and self.view_maker is not None
            and trainer is not None
            and trainer.training
        ):
            return self.view_maker(batch, trainer.current_epoch)
        return batch

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        assert self.collate is not None, "setup() has not run"
        return DataLoader(
            _IndexedRows(self.splits[split]),
            batch_size=batch_size,
            shuffle=shuffle,
            # Full batches only in training, so mini-batch splits and group statistics are stable.
            drop_last=shuffle,
            collate_fn=self.collate if shuffle else self.val_collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
