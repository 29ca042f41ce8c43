"""Reward functions for tests, importable by dotted path from YAML and the command line."""

from __future__ import annotations

from typing import Any


def length_reward(completions: list[str], **_: Any) -> list[float]:
    """Longer responses score higher: gives every group reward variance, so every step learns."""
    return [len(text) / 100.0 for text in completions]


def raising_reward(completions: list[str], **_: Any) -> list[float]:
    raise RuntimeError("this reward always fails")


def every_fourth_reward(completions: list[str], **_: Any) -> list[float]:
    """1.0 for the first response of every four, else 0.0: whatever the responses say, the mean
    over any multiple of four responses is exactly 0.25."""
    return [float(i % 4 == 0) for i in range(len(completions))]
