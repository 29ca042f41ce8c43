"""The DataModule: collation into PromptBatch, and clear errors for unusable rows."""

from __future__ import annotations

import datasets
import pytest

from cppo_lightning.data import VisionLanguageDataModule
from cppo_lightning.data.datamodule import PromptCollator
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
    assert batch.vision["image_grid_thw"].tolist() == [[1, 8, 8]] * 3  # 112 px / 14 px patches
    assert batch.vision["pixel_values"].shape[0] == 3 * 64
    assert batch.image_counts.tolist() == [1, 1, 1]
    assert batch.columns["answer"] == [r["answer"] for r in shapes_rows[:3]]
    assert "image" not in batch.columns
    # 16 image tokens per prompt after the 2 x 2 merge.
    assert (batch.mm_token_type_ids == 1).sum(1).tolist() == [16, 16, 16]


def test_unusable_rows_are_dropped_and_counted(tiny_model_dir):
    ds = build_dataset(6, seed=0)
    rows = ds.cast_column("image", datasets.Image(decode=False)).to_list()
    rows[1]["image"] = None
    rows[2]["answer"] = ""
    rows[3]["image"] = {"bytes": b"not an image", "path": None}
    rows[4]["image"] = {"bytes": None, "path": "/no/such/file.png"}
    features = ds.features.copy()
    features["image"] = datasets.Image(decode=False)
    broken = datasets.Dataset.from_list(rows, features=features)
    module = VisionLanguageDataModule(
        dataset=InMemory(broken, ds), processor_name_or_path=str(tiny_model_dir), batch_size=1
    )
    module.setup("fit")
    report = module.reports["train"]
    assert dict(report) == {
        "no image": 1,
        "empty answer": 1,
        "unreadable image": 1,
        "image file missing": 1,
    }
    assert report.kept == 2 and len(module.splits["train"]) == 2
    assert "kept 2 of 6 rows" in report.summary()
    assert len(list(module.train_dataloader())) == 2  # training goes on with the good rows


def test_a_split_with_no_usable_row_says_why(tiny_model_dir):
    ds = build_dataset(2, seed=0).map(lambda row: {"answer": " "})
    module = VisionLanguageDataModule(
        dataset=InMemory(ds, ds), processor_name_or_path=str(tiny_model_dir)
    )
    with pytest.raises(ValueError, match=r"every row of the 'train' split was dropped.*2 empty"):
        module.setup("fit")


def test_a_missing_column_is_named(tiny_model_dir):
    ds = build_dataset(2, seed=0)
    module = VisionLanguageDataModule(
        dataset=InMemory(ds, ds),
        processor_name_or_path=str(tiny_model_dir),
        answer_column="solution_text",
    )
    with pytest.raises(ValueError, match=r"no column\(s\) \['solution_text'\]"):
        module.setup("fit")
    unknown = ds.rename_columns({"question": "text_in"})
    module = VisionLanguageDataModule(
        dataset=InMemory(unknown, unknown), processor_name_or_path=str(tiny_model_dir)
    )
    with pytest.raises(ValueError, match="none of the usual question columns"):
        module.setup("fit")


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
