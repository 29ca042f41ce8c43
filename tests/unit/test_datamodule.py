"""The DataModule: collation into PromptBatch, and clear errors for unusable rows."""

from __future__ import annotations

import datasets
import pytest

from cppo_lightning.data import VisionLanguageDataModule
from cppo_lightning.data.datamodule import PromptCollator, check_rows
from cppo_lightning.data.synthetic import build_dataset


class InMemory:
    def __init__(self, train: datasets.Dataset, validation: datasets.Dataset) -> None:
        self.splits = datasets.DatasetDict(train=train, validation=validation)

    def load(self) -> datasets.DatasetDict:
        return self.splits


def test_collate_left_pads_and_keeps_columns(tiny_policy, shapes_rows):
    _, processor = tiny_policy
    batch = PromptCollator(processor, "Answer.")(shapes_rows[:3])
    assert batch.input_ids.shape == batch.attention_mask.shape == batch.mm_token_type_ids.shape
    assert batch.attention_mask[:, -1].all(), "prompts are left-padded"
    assert batch.image_grid_thw.tolist() == [[1, 8, 8]] * 3  # 112 px / 14 px patches
    assert batch.pixel_values.shape[0] == 3 * 64
    assert batch.columns["answer"] == [r["answer"] for r in shapes_rows[:3]]
    assert "image" not in batch.columns
    # 16 image tokens per prompt after the 2 x 2 merge.
    assert (batch.mm_token_type_ids == 1).sum(1).tolist() == [16, 16, 16]


def test_rows_without_image_or_answer_are_named():
    ds = build_dataset(4, seed=0)
    no_answer = ds.map(
        lambda row, i: {"answer": "" if i == 2 else row["answer"]}, with_indices=True
    )
    with pytest.raises(ValueError, match="row 2 of the 'train' split has an empty 'answer'"):
        check_rows(no_answer, "train", "image", ("question", "answer"))
    rows = ds.to_list()
    rows[1]["image"] = None
    no_image = datasets.Dataset.from_list(rows, features=ds.features)
    with pytest.raises(ValueError, match="row 1 of the 'train' split has no image"):
        check_rows(no_image, "train", "image", ("question", "answer"))
    with pytest.raises(ValueError, match="no column 'solution_text'"):
        check_rows(ds, "train", "image", ("question", "solution_text"))


def test_setup_applies_the_column_mapping(tiny_model_dir):
    ds = build_dataset(4, seed=0).rename_columns({"question": "problem", "answer": "solution_gt"})
    module = VisionLanguageDataModule(
        dataset=InMemory(ds, ds),
        processor_name_or_path=str(tiny_model_dir),
        batch_size=2,
        question_column="problem",
        answer_column="solution_gt",
    )
    module.setup("fit")
    batch = next(iter(module.train_dataloader()))
    assert batch.num_prompts == 2 and len(batch.columns["answer"]) == 2


def test_missing_split_is_named(tiny_model_dir):
    ds = build_dataset(2, seed=0)
    source = InMemory(ds, ds)
    source.splits = datasets.DatasetDict(train=ds)
    module = VisionLanguageDataModule(dataset=source, processor_name_or_path=str(tiny_model_dir))
    with pytest.raises(ValueError, match="needs 'train' and 'validation'"):
        module.setup("fit")
