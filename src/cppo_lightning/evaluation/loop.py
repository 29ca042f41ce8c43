"""``cppo evaluate`` on Lightning: the predict loop runs the units under the trainer's strategy.

- :class:`EvalDataModule` loads the sets, plans the units (:mod:`.engine`), leaves out those
  already in ``responses.jsonl`` (resume) and gives this rank its share; one batch of the loader is
  one unit (``batch_size=None``), so Lightning's distributed sampler is not used: the shard is
  fixed by the unit plan, the same whatever the world size.
- :class:`EvalModule` holds the policy and the rollout engine; ``predict_step`` samples (through
  the engine) and grades a unit.
- :class:`ResponseWriter` appends each unit's records to ``responses.jsonl`` as it is produced,
  and after a SIGTERM stops the loop once the unit in progress is written.
- :class:`EvalProgressBar` counts prompts and shows the running accuracy under each image
  condition and an ETA.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader, Dataset

from cppo_lightning.evaluation.conditions import ImageConditions
from cppo_lightning.evaluation.engine import (
    EvalBatch,
    EvalUnit,
    PreparedSet,
    plan_units,
    score_batch,
    shard,
)
from cppo_lightning.evaluation.report import RESPONSES, append_records, read_records, unit_done
from cppo_lightning.evaluation.sets import EvalSet
from cppo_lightning.policy import suppressed_token_ids
from cppo_lightning.rollout import HFGenerate, RolloutEngine, Sampling


class UnitDataset(Dataset):
    """Units collated into :class:`EvalBatch` es (images read and conditioned on access)."""

    def __init__(
        self,
        units: Sequence[EvalUnit],
        sets: dict[str, PreparedSet],
        conditions: ImageConditions,
    ) -> None:
        self.units = list(units)
        self.sets = sets
        self.conditions = conditions

    def __len__(self) -> int:
        return len(self.units)

    def __getitem__(self, index: int) -> EvalBatch:
        unit = self.units[index]
        return EvalBatch(unit, self.sets[unit.benchmark].prompts(unit, self.conditions))


def _single(item: Any) -> Any:
    return item


class EvalDataModule(pl.LightningDataModule):
    """The units this rank still has to score.

    Args:
        sets: The evaluation sets.
        processor: The model's processor.
        conditions: Image condition names.
        image_conditions: How the condition images are made.
        samples: k, responses per prompt.
        batch_size: Prompts per unit (one ``generate`` call of ``batch_size x samples``).
        seed: Seed of sampling and of the shuffle.
        output: The output directory (``responses.jsonl`` is read there to resume).
        num_workers: DataLoader workers that read and condition images.
    """

    def __init__(
        self,
        sets: Sequence[EvalSet],
        processor: Any,
        conditions: Sequence[str],
        image_conditions: ImageConditions,
        samples: int,
        batch_size: int,
        seed: int,
        output: Path,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.eval_sets = list(sets)
        self.processor = processor
        self.conditions = list(conditions)
        self.image_conditions = image_conditions
        self.samples = samples
        self.batch_size = batch_size
        self.seed = seed
        self.output = output
        self.num_workers = num_workers
        self.prepared: dict[str, PreparedSet] = {}
        self.units: list[EvalUnit] = []
        self.todo: list[EvalUnit] = []

    def prepare_sets(self) -> None:
        """Load every set (row checks, shuffle partners) and plan the units; idempotent."""
        if self.prepared:
            return
        need_partners = "shuffled" in self.conditions
        for eval_set in self.eval_sets:
            self.prepared[eval_set.name] = PreparedSet(
                eval_set, self.processor, need_partners=need_partners, seed=self.seed
            )
        self.units = plan_units(
            list(self.prepared.values()), self.conditions, self.batch_size, self.seed
        )

    def setup(self, stage: str | None = None) -> None:
        self.prepare_sets()
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        done = set(read_records(self.output / RESPONSES))
        self.todo = [
            unit
            for unit in shard(self.units, rank, world)
            if not unit_done(unit, self.prepared[unit.benchmark], self.samples, done)
        ]

    @property
    def prompts_to_score(self) -> int:
        """Prompts (x conditions) this rank still scores."""
        return sum(len(unit.rows) for unit in self.todo)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(
            UnitDataset(self.todo, self.prepared, self.image_conditions),
            batch_size=None,
            shuffle=False,
            collate_fn=_single,
            num_workers=self.num_workers,
        )


class EvalModule(pl.LightningModule):
    """The policy under evaluation.

    Args:
        load: Returns ``(policy, processor)``; called once, in ``configure_model`` (under the
            trainer's strategy, on each rank).
        sets: The evaluation sets by name (their graders).
        sampling: How responses are sampled.
        samples: k.
        engine: What samples them (:class:`~cppo_lightning.rollout.HFGenerate` when None); told
            of the policy (``on_policy_update``) once it is loaded.
    """

    def __init__(
        self,
        load: Callable[[], tuple[torch.nn.Module, Any]],
        sets: dict[str, EvalSet],
        sampling: Sampling,
        samples: int,
        engine: RolloutEngine | None = None,
    ) -> None:
        super().__init__()
        self._load = load
        self.sets = sets
        self.sampling = sampling
        self.samples = samples
        self.engine = engine if engine is not None else HFGenerate()
        self.policy: torch.nn.Module | None = None
        self.processor: Any = None
        self.suppress: list[int] = []
        #: Correct and scored responses of this rank so far, by (benchmark, image condition).
        self.tally: dict[tuple[str, str], tuple[int, int]] = {}

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        self.policy, self.processor = self._load()
        self.policy.eval()
        self.suppress = suppressed_token_ids(self.processor)
        self.engine.on_policy_update(self.policy)  # an engine with weights of its own loads these

    def predict_step(self, batch: EvalBatch, batch_idx: int) -> list[dict[str, Any]]:
        assert self.policy is not None
        records = score_batch(
            self.engine,
            self.policy,
            self.processor,
            batch,
            self.sets[batch.unit.benchmark],
            self.sampling,
            self.samples,
            self.suppress,
        )
        key = (batch.unit.benchmark, batch.unit.condition)
        correct, scored = self.tally.get(key, (0, 0))
        self.tally[key] = (correct + sum(r["correct"] for r in records), scored + len(records))
        return records

    def running_accuracy(self) -> dict[str, str]:
        """This rank's accuracy so far under each image condition (``blank``; ``set/blank`` when
        several sets are scored), for the progress bar: the conditions' accuracies differ by
        design, so one figure over all of them would mean nothing."""
        several = len({benchmark for benchmark, _ in self.tally}) > 1
        return {
            (f"{benchmark}/{condition}" if several else condition): f"{correct / scored:.3f}"
            for (benchmark, condition), (correct, scored) in self.tally.items()
            if scored
        }


class ResponseWriter(pl.Callback):
    """Appends every unit's records to ``responses.jsonl`` as soon as the unit is scored.

    Lightning's predict loop notes a SIGTERM and runs on to the last unit (its training and
    validation loops stop): here the loop stops with ``SIGTERMException`` once the unit in
    progress is written, so the file holds whole units and the same command continues.

    A plain callback rather than Lightning's ``BasePredictionWriter``: a unit carries its own
    identity, and the writer's batch-index bookkeeping only warned on every run that it could
    not infer indices from a loader of whole units."""

    def __init__(self, output: Path) -> None:
        self.path = output / RESPONSES

    def on_predict_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        append_records(self.path, outputs)
        if trainer.received_sigterm:
            raise SIGTERMException


class EvalProgressBar(TQDMProgressBar):
    """The predict bar in prompts (x conditions), with this rank's running accuracy under each
    image condition (``original=0.641, blank=0.242``)."""

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_predict_start(trainer, pl_module)
        datamodule = getattr(trainer, "datamodule", None)
        assert isinstance(datamodule, EvalDataModule)
        self._prompts = datamodule.prompts_to_score
        self.predict_progress_bar.set_description("Evaluating prompts")

    def on_predict_batch_start(self, *args: Any, **kwargs: Any) -> None:
        bar = self.predict_progress_bar
        if bar.total != self._prompts:
            bar.reset(total=self._prompts)

    def on_predict_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self.predict_progress_bar.update(len(batch.unit.rows))
        if isinstance(pl_module, EvalModule) and pl_module.tally:
            self.predict_progress_bar.set_postfix(pl_module.running_accuracy(), refresh=False)
