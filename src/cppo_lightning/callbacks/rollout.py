"""When to sample: one rollout batch right before every training step."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from cppo_lightning.module import CPPOModule
from cppo_lightning.rollout import HFGenerate, RolloutEngine, Sampling


class RolloutCallback(pl.Callback):
    """Samples G responses per prompt before each training step (the rollout).

    The scored :class:`~cppo_lightning.records.RolloutBatch` is handed to the module with
    ``set_rollout``; the policy samples in eval mode, without gradients. The ``cppo`` CLI always
    adds one, configured under ``rollout:``; a subclass listed under ``trainer.callbacks``
    replaces it (this one then stands aside, and says so once). The callback in charge hands its
    engine to the module (``set_rollout_engine``), so validation and the ``Evaluation`` callback
    sample with it too.

    Args:
        group_size: G, responses sampled per prompt (at least 2).
        max_new_tokens: Longest response, in tokens.
        temperature: Sampling temperature (> 0).
        top_p: Nucleus sampling mass; 1.0 keeps the whole distribution.
        top_k: Top-k sampling; 0 keeps the whole vocabulary.
        generation_batch_size: Most responses per ``generate`` call (the prompts of a rollout
            batch are generated in chunks of whole groups); all at once when None. Bounds the
            KV cache: B x G x (prompt + max_new_tokens) positions otherwise.
        engine: What samples the responses, of training rollouts, validation and the
            ``Evaluation`` callback alike (``class_path`` of a
            :class:`~cppo_lightning.rollout.RolloutEngine`); Hugging Face ``generate`` on the
            policy (:class:`~cppo_lightning.rollout.HFGenerate`) when None.
    """

    def __init__(
        self,
        group_size: int = 4,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        generation_batch_size: int | None = None,
        engine: RolloutEngine | None = None,
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
        self.engine = engine if engine is not None else HFGenerate()
        self.replaced_by: RolloutCallback | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        rollers = [cb for cb in trainer.callbacks if isinstance(cb, RolloutCallback)]  # type: ignore[attr-defined]
        custom = [cb for cb in rollers if type(cb) is not RolloutCallback]
        if len(rollers) > 1 and len(custom) != 1:
            names = ", ".join(type(cb).__name__ for cb in rollers)
            raise ValueError(
                f"{len(rollers)} rollout callbacks ({names}) would each sample every batch: "
                "keep one. A RolloutCallback subclass listed "
                "under trainer.callbacks replaces the one of the `rollout:` section."
            )
        if len(rollers) > 1 and self is not custom[0]:
            self.replaced_by = custom[0]
            rank_zero_info(
                f"rollout: {type(custom[0]).__name__} from trainer.callbacks collects the "
                "rollouts; the `rollout:` section's callback stands aside."
            )
            return
        if isinstance(pl_module, CPPOModule):  # validation and evaluation sample with it too
            pl_module.set_rollout_engine(self.engine)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.replaced_by is not None:
            return
        if not isinstance(pl_module, CPPOModule):
            raise TypeError(f"RolloutCallback needs a CPPOModule, got {type(pl_module).__name__}.")
        if pl_module.group_size != self.group_size:
            raise ValueError(
                f"rollout.group_size={self.group_size} but "
                f"model.group_size={pl_module.group_size}: "
                "set them equal (the `cppo` CLI links them)."
            )
        pl_module.sync_rollout_engine()  # a no-op but on a resumed run's first batch
        pl_module.set_rollout(self.collect(pl_module, batch))

    def collect(self, pl_module: CPPOModule, batch: Any) -> Any:
        """The scored rollout batch for ``batch`` (override to change how rollouts are made)."""
        return pl_module.collect_rollout(batch, self.sampling, engine=self.engine)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self.replaced_by is None and isinstance(pl_module, CPPOModule):
            pl_module.sync_rollout_engine()  # the engine's on_policy_update, once per step
