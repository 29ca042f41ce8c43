"""The ``cppo`` command: LightningCLI over :class:`CPPOModule` and the DataModule.

``cppo fit --config configs/base.yaml`` trains; ``--print_config`` shows every knob with its
documentation. Values that must agree live in one place and are linked (see
``add_arguments_to_parser``).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from cppo_lightning.callbacks import (
    CPLWeight,
    PerceptionTokens,
    RolloutCallback,
    RunProgressBar,
    SaveOnStop,
)
from cppo_lightning.checkpoints import install_atomic_checkpoints
from cppo_lightning.data import VisionLanguageDataModule
from cppo_lightning.module import CPPOModule
from cppo_lightning.resume import SPECIAL_PATHS, CheckpointError, compare_settings, read_checkpoint


class CPPOCLI(LightningCLI):
    """LightningCLI with the rollout callback always on (configured under ``rollout:``) and
    CPPO's perception-token and CPL-weight callbacks under ``perception_tokens:`` and
    ``cpl_weight:`` (null for GRPO and PAPO)."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # Lightning's `test` and `predict` need test/predict steps this module does not have:
        # held-out evaluation is `cppo evaluate` (and `cppo validate`).
        return {
            key: value
            for key, value in LightningCLI.subcommands().items()
            if key in ("fit", "validate")
        }

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(RolloutCallback, "rollout")
        # Run after the rollout callback (callbacks keep this order), so rollout-time detection
        # sees the new rollout batch.
        parser.add_lightning_class_args(
            PerceptionTokens, "perception_tokens", subclass_mode=True, required=False
        )
        parser.add_lightning_class_args(CPLWeight, "cpl_weight", subclass_mode=True, required=False)
        parser.link_arguments("rollout.group_size", "model.group_size")
        parser.link_arguments("rollout.temperature", "model.temperature")
        parser.link_arguments("rollout.max_new_tokens", "model.max_new_tokens")
        parser.link_arguments("rollout.generation_batch_size", "model.generation_batch_size")
        parser.link_arguments("model.model_name_or_path", "data.processor_name_or_path")

    def _parse_ckpt_path(self) -> None:
        # Lightning's version re-applies the checkpoint's hyper-parameters over the user's
        # settings. Here the user's settings stand: the checkpoint is read (a bad file is refused
        # by name), settings that cannot change are refused and the others are logged.
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        path = self.config[subcommand].get("ckpt_path")
        if not path or str(path) in SPECIAL_PATHS or os.path.isdir(path):
            return  # Lightning resolves the special names; sharded checkpoints are folders
        try:
            checkpoint = read_checkpoint(str(path), subcommand)
            given = yaml.safe_load(self.parser.dump(self.config, skip_link_targets=False))
            changes = compare_settings(
                checkpoint["hyper_parameters"], given[subcommand]["model"], str(path)
            )
        except CheckpointError as error:
            self.parser.error(str(error))
        for change in changes:
            rank_zero_info(f"resume: {change}")

    def before_instantiate_classes(self) -> None:
        if self.subcommand == "fit":
            _check_bounded(self.config["fit"]["trainer"])

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        # A section set to null (e.g. `cpl_weight: null` under GRPO) adds no callback.
        extra = [
            self._get(self.config_init, key) for key in self._parser(self.subcommand).callback_keys
        ]
        trainer_config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        if trainer_config.get("enable_checkpointing") is False:
            _leave_out_checkpoints(trainer_config)
        always = [cb for cb in extra if cb is not None] + [
            SaveOnStop()
        ]  # save before stopping early
        if _wants_default_progress_bar(trainer_config):
            always.append(RunProgressBar())
        trainer = self._instantiate_trainer(trainer_config, always)
        install_atomic_checkpoints(trainer)  # checkpoint files are whole or absent
        return trainer


def _check_bounded(trainer: Any) -> None:
    """Refuse a ``cppo fit`` with no length: Lightning would then train for 1000 epochs (the case
    of ``cppo fit`` without ``--config``). ``trainer.max_epochs=-1`` asks for an endless run and
    is kept."""
    if (
        trainer.get("max_steps") in (None, -1)
        and trainer.get("max_epochs") is None
        and trainer.get("max_time") is None
    ):
        raise SystemExit(
            "cppo fit: the run has no length (none of trainer.max_steps, trainer.max_epochs or "
            "trainer.max_time is set), so it would train for Lightning's default of 1000 epochs. "
            "Pass a config that sets one (`cppo fit --config configs/base.yaml`: 600 steps) or "
            "--trainer.max_steps N (--trainer.max_epochs -1 for a run without end)."
        )


def _wants_default_progress_bar(trainer_config: dict[str, Any]) -> bool:
    """The bar counts optimizer steps (:class:`RunProgressBar`) unless the config turns the bar
    off or lists a progress bar of its own."""
    from lightning.pytorch.callbacks import ProgressBar

    if trainer_config.get("enable_progress_bar") is False:
        return False
    callbacks = trainer_config.get("callbacks") or []
    if not isinstance(callbacks, list):
        callbacks = [callbacks]
    return not any(isinstance(cb, ProgressBar) for cb in callbacks)


def _leave_out_checkpoints(trainer_config: dict[str, Any]) -> None:
    """``trainer.enable_checkpointing=false`` with a config that lists a ModelCheckpoint (as
    configs/base.yaml does) is the user asking for no checkpoints: the callback is left out, and
    said so, instead of Lightning refusing the combination."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    callbacks = trainer_config.get("callbacks") or []
    if not isinstance(callbacks, list):
        callbacks = [callbacks]
    kept = [cb for cb in callbacks if not isinstance(cb, ModelCheckpoint)]
    if len(kept) < len(callbacks):
        rank_zero_info(
            "trainer.enable_checkpointing=false: leaving out the ModelCheckpoint callback of "
            "trainer.callbacks; the run writes no checkpoints (a SIGTERM stop saves none "
            "either)."
        )
    trainer_config["callbacks"] = kept


def main(args: list[str] | None = None, run: bool = True) -> CPPOCLI:
    """Entry point of the ``cppo`` console script (also callable from Python and tests).

    With ``run=False`` the arguments carry no subcommand and nothing is trained: the CLI only
    parses and instantiates trainer, model and data (used to check configs).
    """
    return CPPOCLI(
        CPPOModule,
        VisionLanguageDataModule,
        args=args,
        run=run,
        trainer_defaults={
            "default_root_dir": "runs",
            # The sanity check runs the whole held-out set before the first update: that is the
            # run's val/accuracy at step 0.
            "num_sanity_val_steps": -1,
            "check_val_every_n_epoch": None,
        },
        save_config_kwargs={"overwrite": True},
        parser_kwargs={
            "description": "cppo fit trains (and resumes with --ckpt_path), cppo validate scores "
            "a checkpoint on the held-out split. Also: `cppo export CKPT OUT` writes a Hugging "
            "Face checkpoint, `cppo evaluate MODEL --eval SET` scores a model on evaluation sets."
        },
        auto_configure_optimizers=False,
    )


def entry_point() -> None:
    """The ``cppo`` console script: like :func:`main`, returning nothing (a returned object would
    become the process's exit status). ``cppo export CKPT OUT`` writes a standalone Hugging Face
    checkpoint (:mod:`cppo_lightning.export`); ``cppo evaluate MODEL --eval SET ...`` scores a
    model on evaluation sets (:mod:`cppo_lightning.evaluation.command`)."""
    if sys.argv[1:2] == ["export"]:
        from cppo_lightning.export import main as export_main

        export_main(sys.argv[2:])
        return
    if sys.argv[1:2] == ["evaluate"]:
        from cppo_lightning.evaluation.command import main as evaluate_main

        evaluate_main(sys.argv[2:])
        return
    main()


if __name__ == "__main__":
    entry_point()
