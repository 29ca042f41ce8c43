"""Callbacks decide *when* things happen; the math they trigger lives elsewhere."""

from cppo_lightning.callbacks.evaluation import Evaluation
from cppo_lightning.callbacks.export import ExportPolicy
from cppo_lightning.callbacks.monitor import PerceptionMonitor
from cppo_lightning.callbacks.perception import CPLWeight, PerceptionTokens
from cppo_lightning.callbacks.rollout import RolloutCallback
from cppo_lightning.callbacks.steps import RunProgressBar, StepCheckpoint
from cppo_lightning.callbacks.stops import SaveOnStop
from cppo_lightning.callbacks.summary import HeldOutEcho, RunSummary

__all__ = [
    "CPLWeight",
    "Evaluation",
    "ExportPolicy",
    "HeldOutEcho",
    "PerceptionMonitor",
    "PerceptionTokens",
    "RolloutCallback",
    "RunProgressBar",
    "RunSummary",
    "SaveOnStop",
    "StepCheckpoint",
]
