"""When to sample: one rollout batch right before every training step."""

from __future__ import annotations

import functools
import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from cppo_lightning.module import CPPOModule
from cppo_lightning.records import PromptBatch, RolloutBatch
from cppo_lightning.rollout import GroupPool, HFGenerate, RolloutEngine, Sampling
from cppo_lightning.seams import GenerationGroup, RolloutFilter, RolloutView


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
        filter: Seam: which groups are trained on (``class_path`` of a
            :class:`~cppo_lightning.seams.RolloutFilter`, e.g. DAPO's
            :class:`~cppo_lightning.methods.DynamicSampling`). While fewer than
            ``data.batch_size`` groups are kept, ``data.batch_size`` more prompts are sampled
            (:meth:`~cppo_lightning.data.VisionLanguageDataModule.extra_prompts`), at most
            ``filter.max_rounds`` rounds in all, every DDP rank as many; a batch the rounds
            could not fill takes dropped groups. Logs ``rollout/sampling_rounds``,
            ``rollout/dropped_groups``, ``rollout/sampling_cap_hit``,
            ``rollout/filled_groups``. None trains on every group.
        view: Seam: which image each response of a group is sampled from (``class_path`` of a
            :class:`~cppo_lightning.seams.RolloutView`, e.g.
            :class:`~cppo_lightning.methods.NoisyRollout`); scoring and training use the
            original image whatever the view. Its ``step`` is the 1-based rollout batch and its
            ``total_steps`` the run's rollout batches (from ``trainer.max_steps``), so a
            resumed run continues its schedule. The view's ``stats(rollout)`` is
            logged under ``rollout/``. None samples every response from the original image.
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
        filter: RolloutFilter | None = None,
        view: RolloutView | None = None,
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
        self.filter = filter
        self.view = view
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
        if self.view is not None and stage == "fit":
            self._datamodule(trainer, "view").carry_images()
        if self.filter is not None and stage == "fit":
            self._datamodule(trainer, "filter")

    @staticmethod
    def _datamodule(trainer: pl.Trainer, seam: str) -> Any:
        datamodule = getattr(trainer, "datamodule", None)
        needed = {"view": "carry_images", "filter": "extra_prompts"}[seam]
        if not callable(getattr(datamodule, needed, None)):
            raise ValueError(
                f"rollout.{seam} needs a DataModule with `{needed}` (cppo_lightning.data."
                f"VisionLanguageDataModule), got {type(datamodule).__name__}."
            )
        return datamodule

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
        if self.filter is None:
            rollout = self.collect(pl_module, batch)
            pl_module.set_rollout(rollout)
            metrics: dict[str, float] = {}
        else:  # seam: which groups are trained on, sampling more prompts if needed
            rollout, metrics = self.collect_filtered(trainer, pl_module, batch)
            pl_module.set_rollout(rollout, batch=batch)
        if self.view is not None:
            metrics.update({f"rollout/{k}": float(v) for k, v in self.view.stats(rollout).items()})
        if metrics:
            # Flushed with the training step's metrics, on its optimizer-step axis; averaged
            # over ranks (every rank logs the same keys).
            pl_module.log_dict(
                metrics,
                on_step=True,
                on_epoch=False,
                batch_size=rollout.num_responses,
                sync_dist=True,
            )

    def collect(self, pl_module: CPPOModule, batch: Any) -> Any:
        """The scored rollout batch for ``batch`` (override to change how rollouts are made)."""
        if self.view is None:
            return pl_module.collect_rollout(batch, self.sampling, engine=self.engine)
        parts = self.view_parts(pl_module, batch)
        return pl_module.collect_rollout(batch, self.sampling, engine=self.engine, parts=parts)

    def view_parts(self, pl_module: CPPOModule, batch: PromptBatch) -> list[GenerationGroup]:
        """The view's parts for ``batch``, at the current rollout batch of the run."""
        assert self.view is not None
        trainer = pl_module.trainer
        per_batch = pl_module.optimizer_steps_per_batch
        total: float = trainer.max_steps // per_batch
        if trainer.max_steps <= 0:
            total = trainer.estimated_stepping_batches  # rollout batches, manual optimisation
            if not math.isfinite(total):
                raise ValueError(
                    f"rollout.view={type(self.view).__name__} anneals over the run: set "
                    "trainer.max_steps (or trainer.max_epochs)."
                )
        step = trainer.global_step // per_batch + 1
        encode = functools.partial(self._datamodule(trainer, "view").encode_view, prompts=batch)
        return self.view.parts(batch, self.group_size, step, max(int(total), 1), encode)

    def collect_filtered(
        self, trainer: pl.Trainer, pl_module: CPPOModule, batch: PromptBatch
    ) -> tuple[RolloutBatch, dict[str, float]]:
        """The rollout batch of ``data.batch_size`` groups the filter keeps (see ``filter``),
        and the metrics of its rounds."""
        assert self.filter is not None
        datamodule = self._datamodule(trainer, "filter")
        pool = GroupPool(datamodule.batch_size, pl_module.processor.tokenizer.pad_token_id)
        rollout = self.collect(pl_module, batch)
        pool.add(rollout, self.filter.keep(rollout))
        while True:
            # Every rank takes part in every round (FSDP's generate gathers weights).
            everyone = self._on_every_rank(trainer, pl_module, pool.enough)
            if everyone or pool.rounds >= self.filter.max_rounds:
                break
            extra = datamodule.extra_prompts(trainer.global_step, pool.rounds, exclude=pool.rows)
            rollout = self.collect(pl_module, extra)
            pool.add(rollout, self.filter.keep(rollout))
        # The same number of groups on every rank (fewer only if rows could not be read).
        size = int(
            trainer.strategy.reduce(
                torch.tensor(pool.available, device=pl_module.device), reduce_op="min"
            )
        )
        merged = pool.batch(size)
        metrics = {
            "rollout/sampling_rounds": float(pool.rounds),
            "rollout/dropped_groups": float(pool.dropped_groups),
            "rollout/sampling_cap_hit": float(not everyone),
            "rollout/filled_groups": float(max(0, size - pool.kept_groups)),
        }
        return merged, metrics

    @staticmethod
    def _on_every_rank(trainer: pl.Trainer, pl_module: pl.LightningModule, flag: bool) -> bool:
        missing = torch.tensor(float(not flag), device=pl_module.device)
        return float(trainer.strategy.reduce(missing, reduce_op="sum")) == 0.0

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
