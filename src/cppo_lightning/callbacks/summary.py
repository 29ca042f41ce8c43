"""What a run says on the console: where its files go, each held-out measurement, and where its
results are when it ends. On the default run (``RUN`` = ``runs/base/lightning_logs/version_0``)::

    run folder: RUN (watch it: tensorboard --logdir RUN)
    held-out at step 0: val/accuracy 0.415, val/reward 0.432, val/response_length 19.305
    held-out at step 0: eval/synthetic accuracy: original 0.641, blank 0.242 (gap 0.398), ...
    ...
    done at step 600:
      checkpoint: RUN/checkpoints/last.ckpt
      exported policy: RUN/hf_policy
      TensorBoard: tensorboard --logdir RUN

Lines go through Lightning's rank-zero logger, as its own "GPU available" lines do, so whatever
quiets those quiets these.
"""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from cppo_lightning.callbacks.export import ExportPolicy


class HeldOutEcho(Logger):
    """A logger that prints the held-out metrics it is sent (``val/*``, ``eval/*``) as one line
    per measurement, and ignores the rest. Validation and the ``Evaluation`` callback send their
    figures to every logger of the run (validation also the one before the first update, which
    Lightning keeps out of its callback metrics), so this sees each of them once.

    Args:
        beside: The run's first logger, whose name and version this one reports: the progress
            bar's ``v_num`` joins the versions of all loggers and shows its last 4 characters,
            which a version of its own (None) would turn into ``v_num=None``.
    """

    def __init__(self, beside: Logger | None = None) -> None:
        super().__init__()
        self.beside = beside

    @property
    def name(self) -> str | None:
        return None if self.beside is None else self.beside.name

    @property
    def version(self) -> int | str | None:
        return None if self.beside is None else self.beside.version

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        at = f"held-out at step {step}" if step is not None else "held-out"
        val = {k: v for k, v in metrics.items() if k.startswith("val/")}
        if val:
            rank_zero_info(f"{at}: " + ", ".join(f"{k} {_number(v)}" for k, v in val.items()))
        for line in eval_lines(metrics):
            rank_zero_info(f"{at}: {line}")


def eval_lines(metrics: dict[str, float]) -> list[str]:
    """One line per benchmark of ``eval/<benchmark>/<images>/<figure>`` metrics: the accuracy
    under each image condition, with its gap to ``original`` where there is one."""
    accuracy: dict[str, dict[str, float]] = {}
    gaps: dict[tuple[str, str], float] = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) != 4 or parts[0] != "eval":
            continue
        _, benchmark, images, figure = parts
        if figure == "accuracy":
            accuracy.setdefault(benchmark, {})[images] = value
        elif figure == "gap":
            gaps[(benchmark, images)] = value
    lines = []
    for benchmark, by_images in accuracy.items():
        shown = [
            f"{images} {_number(value)}"
            + (f" (gap {_number(gaps[benchmark, images])})" if (benchmark, images) in gaps else "")
            for images, value in by_images.items()
        ]
        lines.append(f"eval/{benchmark} accuracy: " + ", ".join(shown))
    return lines


def _number(value: Any) -> str:
    return f"{float(value):.3f}"


class RunSummary(pl.Callback):
    """Prints the run folder when fit starts, every held-out measurement as it is logged (through
    :class:`HeldOutEcho`, added to the run's loggers when it has any), and, when fit ends, the
    checkpoints, the exported policy and the TensorBoard command.

    ``cppo fit`` adds it to every run (after the config's callbacks, so the end-of-run lines come
    after the export's) and announces the run folder before the data is set up
    (:meth:`announce`); a run without loggers (``trainer.logger=false``) prints no held-out
    lines, as it logs none."""

    def __init__(self) -> None:
        self._announced = False

    def announce(self, trainer: pl.Trainer) -> None:
        """Print the run folder (once per fit; every rank reads it, rank 0 prints)."""
        if self._announced:
            return
        self._announced = True
        folder = str(trainer.log_dir or trainer.default_root_dir)
        watch = _tensorboard_dirs(trainer)
        rank_zero_info(
            f"run folder: {folder}"
            + (f" (watch it: tensorboard --logdir {watch[0]})" if watch else "")
        )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if trainer.loggers and not any(isinstance(lg, HeldOutEcho) for lg in trainer.loggers):
            # Appended: the first logger decides trainer.log_dir and the checkpoint folder.
            trainer.loggers = [*trainer.loggers, HeldOutEcho(beside=trainer.loggers[0])]
        self.announce(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        lines = [f"done at step {trainer.global_step}:"]
        for callback in trainer.checkpoint_callbacks:
            path = getattr(callback, "last_model_path", "") or getattr(
                callback, "best_model_path", ""
            )
            if path and os.path.exists(path):
                lines.append(f"  checkpoint: {path}")
        for callback in getattr(trainer, "callbacks", []):  # set by Lightning, not declared
            if isinstance(callback, ExportPolicy) and callback.path is not None:
                lines.append(f"  exported policy: {callback.path}")
        for folder in _tensorboard_dirs(trainer):
            lines.append(f"  TensorBoard: tensorboard --logdir {folder}")
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger):
                lines.append(f"  metrics: {os.path.join(logger.log_dir, 'metrics.csv')}")
        for line in lines:
            rank_zero_info(line)
        self._announced = False  # a later fit with this trainer announces its folder again


def _tensorboard_dirs(trainer: pl.Trainer) -> list[str]:
    return [lg.log_dir for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
