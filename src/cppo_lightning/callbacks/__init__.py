"""Callbacks decide *when* things happen; the math they trigger lives elsewhere."""

from cppo_lightning.callbacks.export import ExportPolicy
from cppo_lightning.callbacks.rollout import RolloutCallback

__all__ = ["ExportPolicy", "RolloutCallback"]
