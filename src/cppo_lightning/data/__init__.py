"""Data: dataset sources (the synthetic shapes task, ...) and the LightningDataModule."""

from cppo_lightning.data.datamodule import DatasetSource, VisionLanguageDataModule
from cppo_lightning.data.synthetic import SyntheticShapes

__all__ = ["DatasetSource", "SyntheticShapes", "VisionLanguageDataModule"]
