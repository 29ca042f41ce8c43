"""Data: dataset sources (the synthetic shapes task, hub or local files) and the DataModule."""

from cppo_lightning.data.datamodule import DatasetSource, VisionLanguageDataModule
from cppo_lightning.data.hf import DatasetSpec, HFDataset
from cppo_lightning.data.rows import PAPER_INSTRUCTION
from cppo_lightning.data.synthetic import SyntheticShapes

__all__ = [
    "PAPER_INSTRUCTION",
    "DatasetSource",
    "DatasetSpec",
    "HFDataset",
    "SyntheticShapes",
    "VisionLanguageDataModule",
]
