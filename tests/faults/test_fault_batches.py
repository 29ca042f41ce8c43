"""Fewer usable rows than one full training batch is refused at setup, not trained as 0 steps."""

from __future__ import annotations

import datasets
import pytest

from cppo_lightning.data import VisionLanguageDataModule
from cppo_lightning.data.synthetic import build_dataset


class _InMemory:
    def __init__(self, train: datasets.Dataset, validation: datasets.Dataset) -> None:
        self.splits = datasets.DatasetDict(train=train, validation=validation)

    def load(self) -> datasets.DatasetDict:
        return self.splits


def _with_unusable_rows(count: int, unusable: int) -> datasets.Dataset:
    ds = build_dataset(count, seed=0)
    rows = ds.to_list()
    for row in rows[:unusable]:
        row["answer"] = ""
    return datasets.Dataset.from_list(rows, features=ds.features)


def test_fewer_usable_rows_than_a_batch_is_refused_naming_both(tiny_model_dir):
    """5 rows of which 2 are dropped leave 3 usable, under data.batch_size 4: the train loader
    (full batches only) would be empty, so setup('fit') refuses, naming the usable rows, the
    drop reasons and data.batch_size."""
    module = VisionLanguageDataModule(
        dataset=_InMemory(_with_unusable_rows(5, 2), build_dataset(2, seed=1)),
        processor_name_or_path=str(tiny_model_dir),
        batch_size=4,
    )
    with pytest.raises(ValueError, match=r"3 usable row.*2 empty answer.*data\.batch_size 4"):
        module.setup("fit")


def test_exactly_one_full_batch_is_enough(tiny_model_dir):
    """3 usable rows under batch_size 3 make one batch: accepted."""
    module = VisionLanguageDataModule(
        dataset=_InMemory(_with_unusable_rows(5, 2), build_dataset(2, seed=1)),
        processor_name_or_path=str(tiny_model_dir),
        batch_size=3,
    )
    module.setup("fit")
    assert len(list(module.train_dataloader())) == 1
