"""When to sample: one rollout batch right before every training step."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from cppo_lightning.module import CPPOModule
from cppo_lightning.rollout import Sampling


class RolloutCallback(pl.Callback):
    """Samples G responses per prompt before each training step (the rollout).

    The scored :class:`~cppo_lightning.records.RolloutBatch` is handed to the module with
    ``set_rollout``; the policy samples in eval mode, without gradients.

    Args:
        group_size: G, responses sampled per prompt (at least 2).
        max_new_tokens: Longest response, in tokens.
        temperature: Sampling temperature (> 0).
        top_p: Nucleus sampling mass; 1.0 keeps the whole distribution.
        top_k: Top-k sampling; 0 keeps the whole vocabulary.
        generation_batch_size: Most responses per ``generate`` call (the prompts of a rollout
            batch are generated in chunks of whole groups); all at once when None. Bounds the
            KV cache: B x G x (prompt + max_new_tokens) positions otherwise.
    """

    def __init__(
        self,
        group_size: int = 4,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        generation_batch_size: int | None = None,
    ) -> None:
        if group_size < 2:
            raise ValueError(
                f"rollout.group_size must be >= 2 for group advantages, got {group_size}."
            )
        if max_new_tokens < 1:
            raise ValueError(f"rollout.max_new_tokens must be >= 1, got {max_new_tokens}.")
        if temperature <= 0:
            raise ValueError(f"rollout.temperature must be > 0 for RL sampling, got {temperature}.")
        if not 0 < top_p <= 1:
            raise ValueError(f"rollout.top_p must be in (0, 1], got {top_p}.")
        if generation_batch_size is not None and generation_batch_size < group_size:
            raise ValueError(
                f"rollout.generation_batch_size={generation_batch_size} is smaller than one "
                f"group (rollout.group_size={group_size}): set it to a multiple of the group size."
            )
        self.group_size = group_size
        self.sampling = Sampling(max_new_tokens, temperature, top_p, top_k, generation_batch_size)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not isinstance(pl_module, CPPOModule):
            raise TypeError(f"RolloutCallback needs a CPPOModule, got {type(pl_module).__name__}.")
        if pl_module.group_size != self.group_size:
            raise ValueError(
                f"rollout.group_size={self.group_size} but "
                f"model.group_size={pl_module.group_size}: "
                "set them equal (the `cppo` CLI links them)."
            )
        pl_module.set_rollout(pl_module.collect_rollout(batch, self.sampling))
