"""When to evaluate during fit: ``cppo evaluate``'s evaluation of the policy on a schedule.

    trainer:
      callbacks:
        - class_path: cppo_lightning.callbacks.Evaluation
          init_args:
            sets: [configs/eval/synthetic.yaml]
            images: [original, blank, shuffled]
            every_n_steps: 100

Logs ``eval/<benchmark>/<images>/accuracy`` (and ``pass_at_k``, ``format_rate``, ``gap``,
``answer_kept``) at the number of optimizer steps done, before the first update and every
``every_n_steps``, so a run shows held-out accuracy and its visual-reliance gap over time.
``val/accuracy`` is not touched. Each rank scores its share of the batches (the same shard as
``cppo evaluate``'s) and the sums are added over ranks by the trainer's strategy. Responses are
sampled by the run's rollout engine (``rollout.engine``, the module's ``rollout_engine``), in a
forked, seeded RNG: evaluating does not change the training run. ``trainer.limit_val_batches``
limits it as it limits validation (configs/debug.yaml): an int n scores the first n batches of
each set under each condition, a fraction that share of them, 0 turns it off.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from cppo_lightning.evaluation.conditions import ImageConditions, check_conditions
from cppo_lightning.evaluation.engine import (
    EvalBatch,
    PreparedSet,
    plan_units,
    score_batch,
    shard,
)
from cppo_lightning.evaluation.report import Key, accumulate, results_of
from cppo_lightning.evaluation.sets import EvalSet, load_eval_set
from cppo_lightning.module import CPPOModule
from cppo_lightning.rollout import Sampling

#: The figures logged per (benchmark, images).
LOGGED = ("accuracy", "pass_at_k", "format_rate", "gap", "answer_kept")


class Evaluation(pl.Callback):
    """Evaluates the policy on held-out sets under image conditions during fit.

    Args:
        sets: Evaluation sets: ``configs/eval/*.yaml`` files or inline dataset specs, as
            ``cppo evaluate --eval`` takes them.
        images: Image conditions (``original`` first is implied for the gap).
        samples: k, responses per prompt.
        temperature: Sampling temperature; 0 decodes greedily (then ``samples`` must be 1).
        top_p: Nucleus sampling mass.
        max_new_tokens: Response budget; the set's own when None, else ``model.max_new_tokens``.
        batch_size: Prompts per ``engine.sample`` call.
        every_n_steps: Optimizer steps between evaluations; the first is before any update.
        seed: Seed of sampling and of the ``shuffled`` pairing.
        num_rows: Evaluate only the first ``num_rows`` rows of each set (None: all of them).
    """

    def __init__(
        self,
        sets: list[str],
        images: list[str] | None = None,
        samples: int = 1,
        temperature: float = 0.0,
        top_p: float = 1.0,
        max_new_tokens: int | None = None,
        batch_size: int = 32,
        every_n_steps: int = 100,
        seed: int = 0,
        num_rows: int | None = None,
    ) -> None:
        if not sets:
            raise ValueError("Evaluation.sets is empty: name at least one configs/eval/*.yaml.")
        if samples < 1:
            raise ValueError(f"Evaluation.samples must be >= 1, got {samples}.")
        if temperature < 0 or (temperature == 0 and samples > 1):
            raise ValueError(
                f"Evaluation: temperature must be >= 0, and samples 1 when it is 0 (greedy); got "
                f"temperature={temperature}, samples={samples}."
            )
        if every_n_steps < 1 or batch_size < 1:
            raise ValueError(
                f"Evaluation.every_n_steps and batch_size must be >= 1, got {every_n_steps} and "
                f"{batch_size}."
            )
        if num_rows is not None and num_rows < 1:
            raise ValueError(f"Evaluation.num_rows must be >= 1 or null, got {num_rows}.")
        self.eval_sets: list[EvalSet] = [load_eval_set(s) for s in sets]
        for eval_set in self.eval_sets:
            if num_rows is not None:
                eval_set.num_rows = min(num_rows, eval_set.num_rows or num_rows)
        self.images = check_conditions(images or ["original"])
        self.samples = samples
        self.temperature = temperature
        self.top_p = top_p
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.every_n_steps = every_n_steps
        self.seed = seed
        self._prepared: list[PreparedSet] = []
        self._conditions: ImageConditions | None = None
        self._last_step = -1
        #: The results of the last evaluation (the ``results`` list of ``results.json``).
        self.last_results: list[dict[str, Any]] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        data = getattr(trainer, "datamodule", None)
        self._conditions = ImageConditions(
            getattr(data, "preserving_view", None),
            getattr(data, "removing_view", None),
            getattr(data, "view_seed", 0),
        )
        self._conditions.check(self.images)  # before any training

    def _prepare(self, module: CPPOModule) -> list[PreparedSet]:
        if not self._prepared:
            need = "shuffled" in self.images
            self._prepared = [
                PreparedSet(s, module.processor, need_partners=need, seed=self.seed)
                for s in self.eval_sets
            ]
        return self._prepared

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._maybe_evaluate(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any
    ) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._maybe_evaluate(trainer, pl_module)

    def _maybe_evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step == self._last_step or trainer.sanity_checking:
            return
        if trainer.limit_val_batches == 0:
            return  # held-out evaluation is off, as validation is
        if not isinstance(pl_module, CPPOModule):
            raise TypeError(f"Evaluation needs a CPPOModule, got {type(pl_module).__name__}.")
        self._last_step = trainer.global_step
        self.last_results = self.evaluate(trainer, pl_module)
        metrics = {
            f"eval/{r['benchmark']}/{r['images']}/{figure}": float(r[figure])
            for r in self.last_results
            for figure in LOGGED
            if r.get(figure) is not None
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def evaluate(self, trainer: pl.Trainer, module: CPPOModule) -> list[dict[str, Any]]:
        """Score this rank's share of every set and condition; the results of all ranks."""
        assert self._conditions is not None, "setup() has not run"
        prepared = self._prepare(module)
        rank, world = trainer.global_rank, trainer.world_size
        module.sync_rollout_engine()  # this step's weights: it may run before the rollout callback
        results: list[dict[str, Any]] = []
        for one in prepared:
            budget = self.max_new_tokens or one.eval_set.max_new_tokens or module.max_new_tokens
            sampling = Sampling(budget, self.temperature, top_p=self.top_p)
            planned = plan_units([one], self.images, self.batch_size, self.seed)
            batches = _limit(
                trainer.limit_val_batches, 1 + max((u.batch for u in planned), default=-1)
            )
            units = shard([u for u in planned if u.batch < batches], rank, world)
            records: dict[Key, dict[str, Any]] = {}
            with module.generation_mode():
                for unit in units:
                    batch = move_data_to_device(
                        EvalBatch(unit, one.prompts(unit, self._conditions)), module.device
                    )
                    for r in score_batch(
                        module.rollout_engine,
                        module.policy,  # type: ignore[arg-type]
                        module.processor,
                        batch,
                        one.eval_set,
                        sampling,
                        self.samples,
                        module.suppress_token_ids,
                    ):
                        records[(r["benchmark"], r["images"], r["prompt_id"], r["sample"])] = r
            rows = sorted({row for unit in units for row in unit.rows})
            stats = accumulate(one, self.images, self.samples, records, rows)
            for stat in stats.values():  # add the sums of all ranks
                summed = trainer.strategy.reduce(
                    stat.to_tensor().to(module.device), reduce_op="sum"
                )
                stat.load_tensor(torch.as_tensor(summed))
            results += results_of(one, self.images, stats)
        return results


def _limit(limit: int | float | None, batches: int) -> int:
    """How many of ``batches`` batches ``trainer.limit_val_batches`` lets through, as Lightning
    counts them for validation: an int is a count, a float a share (at least one batch)."""
    if limit is None:
        return batches
    if isinstance(limit, int):
        return min(limit, batches)
    return max(1, int(batches * limit)) if limit > 0 else 0
