"""A training loader that resumes where it stopped: the epoch's order and the batches taken.

Lightning saves and restores any train loader with ``state_dict`` / ``load_state_dict`` (it
then no longer warns that the loader is not resumable). :class:`ResumableLoader` saves how many
batches of the current pass the trainer has taken and, with one process, the seed of the pass's
order (:class:`ShuffledSampler`); under DDP Lightning swaps in a ``DistributedSampler``, whose
order is a function of its seed and the epoch. A resumed pass replays that order and skips the
batches already taken, without loading them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from lightning.pytorch.utilities.seed import isolate_rng
from torch.utils.data import DataLoader, RandomSampler, Sampler


class ShuffledSampler(RandomSampler):
    """``RandomSampler`` that remembers the seed of its current pass, and can replay one.

    The seed is drawn exactly as ``RandomSampler`` draws it (one int64 from the global torch
    generator, when the pass starts), so the order of a run is unchanged.
    """

    def __init__(self, data_source: Any) -> None:
        super().__init__(data_source)
        self.seed: int | None = None  # of the current pass
        self.replay: int | None = None  # the next pass uses this seed instead of drawing one

    def __iter__(self) -> Iterator[int]:
        if self.replay is not None:
            seed, self.replay = self.replay, None
        else:
            seed = int(torch.empty((), dtype=torch.int64).random_().item())
        self.seed = seed
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)
        try:
            yield from super().__iter__()
        finally:
            self.generator = None


class _Skipping(Sampler[list[int]]):
    """A batch sampler's passes, the first ``skip`` batches of the next one left out (the
    length stays the full pass's: Lightning counts the taken batches itself)."""

    def __init__(self, batches: Any, skip: int) -> None:
        self.batches, self.skip = batches, skip

    def __iter__(self) -> Iterator[list[int]]:
        iterator = iter(self.batches)
        for _ in range(self.skip):
            next(iterator, None)
        return iterator

    def __len__(self) -> int:
        return len(self.batches)


class ResumableLoader(DataLoader):
    """A ``DataLoader`` whose state is the current pass's seed and the batches taken from it.

    Args:
        taken: Returns how many batches of the current pass the trainer has finished (read when
            a checkpoint is saved: the loader itself runs ahead of the trainer by the batches
            Lightning prefetches).
        *args, **kwargs: ``DataLoader``'s.
    """

    def __init__(self, *args: Any, taken: Callable[[], int] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.taken = taken
        self._skip = 0

    @property
    def _index_sampler(self) -> Any:
        batches = super()._index_sampler
        return _Skipping(batches, self._skip) if self._skip else batches

    def __iter__(self) -> Any:
        if not self._skip:
            return super().__iter__()
        # The resumed pass was started (and its draws from the global generator made) before
        # the checkpoint: starting it again must not draw again.
        with isolate_rng():
            iterator = super().__iter__()
        self._skip = 0
        return iterator

    def state_dict(self) -> dict[str, Any]:
        seed = self.sampler.seed if isinstance(self.sampler, ShuffledSampler) else None
        return {"taken": self.taken() if self.taken is not None else 0, "seed": seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        taken = int(state_dict["taken"])
        if taken <= 0 or taken >= len(self):
            return  # the checkpoint was written between passes: the next one starts afresh
        self._skip = taken
        if isinstance(self.sampler, ShuffledSampler) and state_dict.get("seed") is not None:
            self.sampler.replay = int(state_dict["seed"])
