"""What a checkpoint holds beyond Lightning's own state, and how it is written.

A resumed run continues the run it was: next to the weights, optimizer, schedules and loop
counters (Lightning's), a checkpoint holds every rank's random-number states
(:func:`gather_rng_states`, restored by :func:`restore_rng_states`) and the train loader's
position (:mod:`cppo_lightning.data.loader`).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn


def rng_states() -> dict[str, Any]:
    """This process's torch (CPU and every CUDA device), numpy and python generator states,
    as tensors and plain values (so a ``weights_only`` load reads them)."""
    kind, keys, position, has_gauss, gauss = np.random.get_state(legacy=True)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [
            kind,
            torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            position,
            has_gauss,
            gauss,
        ],
        "python": random.getstate(),
    }


def set_rng_states(states: dict[str, Any]) -> None:
    """Puts back what :func:`rng_states` returned."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    random.setstate(states["python"])


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's :func:`rng_states`, by rank (a collective: every rank must call it)."""
    mine = rng_states()
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


def restore_rng_states(states: list[dict[str, Any]] | None, rank: int, world_size: int) -> None:
    """Sets this rank's generators to the states the checkpoint saved for it.

    A checkpoint from another number of processes cannot continue exactly; the run goes on
    from the generators as they are, and says so.
    """
    if states is None:
        rank_zero_warn(
            "the checkpoint holds no random-number states (written before they were saved): "
            "the resumed run will not repeat the steps an uninterrupted run would have taken."
        )
        return
    if len(states) != world_size:
        rank_zero_warn(
            f"the checkpoint was written by {len(states)} processes and this run has "
            f"{world_size}: it continues, but not as the interrupted run would have (resume on "
            f"{len(states)} processes for an exact continuation)."
        )
        return
    set_rng_states(states[rank])
