"""Data: dataset sources (the synthetic shapes task, its language-shortcut variant, hub or local
files) and the DataModule."""

from cppo_lightning.data.datamodule import DatasetSource, VisionLanguageDataModule
from cppo_lightning.data.hf import DatasetSpec, HFDataset
from cppo_lightning.data.rows import PAPER_INSTRUCTION
from cppo_lightning.data.shortcut import ShortcutShapes
from cppo_lightning.data.synthetic import SyntheticShapes

__all__ = [
    "PAPER_INSTRUCTION",
    "DatasetSource",
    "DatasetSpec",
    "HFDataset",
    "ShortcutShapes",
    "SyntheticShapes",
    "VisionLanguageDataModule",
]
