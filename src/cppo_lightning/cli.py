"""The ``cppo`` command: LightningCLI over :class:`CPPOModule` and the DataModule.

``cppo fit --config configs/base.yaml`` trains; ``--print_config`` shows every knob with its
documentation. Values that must agree live in one place and are linked (see
``add_arguments_to_parser``).

Code in the working directory is importable, as under ``python -m`` and pytest: with
``mypkg/rewards.py`` there, ``--model.reward.init_args.functions='{accuracy:
mypkg.rewards.my_accuracy}'`` works without ``PYTHONPATH`` (:func:`entry_point` puts the working
directory first on ``sys.path``). A dotted path that does not import is refused with the reason on
the first line, before the usage text.
"""

from __future__ import annotations

import importlib
import linecache
import logging
import os
import re
import sys
import warnings
from types import TracebackType
from typing import Any, NoReturn

import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from cppo_lightning.callbacks import (
    CPLWeight,
    PerceptionTokens,
    RolloutCallback,
    RunProgressBar,
    RunSummary,
    SaveOnStop,
)
from cppo_lightning.checkpoints import install_atomic_checkpoints, remove_stale_temporaries
from cppo_lightning.data import VisionLanguageDataModule
from cppo_lightning.errors import ConfigError
from cppo_lightning.module import CPPOModule
from cppo_lightning.resume import (
    SPECIAL_PATHS,
    CheckpointError,
    compare_settings,
    find_last_checkpoint,
    is_sharded_checkpoint,
    read_checkpoint,
)
from cppo_lightning.run_folder import check_writable, claim_log_versions

# Commands of the `cppo` script that are not Trainer methods (see `entry_point`): listed in
# `cppo --help` next to fit and validate.
OWN_COMMANDS = {
    "evaluate": "Score a model on evaluation sets: cppo evaluate MODEL --eval SET "
    "(cppo evaluate --help).",
    "export": "Write a checkpoint as a Hugging Face model: cppo export CKPT OUT "
    "(cppo export --help).",
    "study": "Train and evaluate methods x seeds on one config and compare them: cppo study "
    "--config CONFIG --methods grpo cppo --seeds 0 1 2 (cppo study --help).",
}
# The module whose `main` runs each of OWN_COMMANDS.
_OWN_MODULES = {
    "evaluate": "evaluation.command",
    "export": "export",
    "study": "study.command",
}


class CPPOArgumentParser(LightningArgumentParser):
    """The parser of ``cppo fit`` / ``cppo validate``: an error caused by a dotted path that does
    not import (a reward function, a ``class_path``) starts with that reason in one line
    (:func:`import_failures`); jsonargparse's usage text and full message follow."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if self.exit_on_error:
            for line in import_failures(message):
                sys.stderr.write(f"cppo: {line}\n")
        super().error(message, ex)


# Where jsonargparse names a value it tried to import: a callable's "Got value: a.b.c" and a
# class's "Problem with given class_path 'a.b.C'".
_IMPORTED = re.compile(r"Got value: ([\w.]+\.\w+)|given class_path '([\w.]+\.\w+)'")


def import_failures(message: str) -> list[str]:
    """One line per dotted path named in a parser error ``message`` that does not import, with
    the reason (the import is retried here: jsonargparse words it differently for each type)."""
    lines: list[str] = []
    for match in _IMPORTED.finditer(message):
        path = match.group(1) or match.group(2)
        reason = _import_error(path)
        line = f"cannot import {path!r}: {reason}"
        if reason is not None and line not in lines:
            lines.append(line)
    return lines


def _import_error(path: str) -> str | None:
    """Why ``path`` (``package.module.name``) does not import; None when it does."""
    module_name, _, name = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        missing = getattr(error, "name", None) or ""
        if missing == path.split(".")[0]:  # not even its package is found
            return (
                f"{error} (code in the working directory is importable; else add its folder to "
                "PYTHONPATH)"
            )
        if missing and f"{module_name}.".startswith(f"{missing}."):  # a module of the path
            return str(error)
        return f"{error} (raised while importing {module_name})"  # one the module imports
    except Exception as error:  # the module itself fails: its own error is the reason
        return f"importing {module_name} raised {type(error).__name__}: {error}"
    if not hasattr(module, name):
        return f"{module_name} has no {name!r}"
    return None


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

    def setup_parser(
        self, add_subcommands: bool, main_kwargs: dict[str, Any], subparser_kwargs: dict[str, Any]
    ) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        subcommands = getattr(self.parser, "_subcommands_action", None)
        if add_subcommands and subcommands is not None:
            # Listed for `cppo --help` (and its usage line); `entry_point` runs them.
            for name, text in OWN_COMMANDS.items():
                subcommands.add_subcommand(name, self.init_parser(description=text), help=text)

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
        if not subcommand or subcommand in OWN_COMMANDS:
            return
        path = self.config[subcommand].get("ckpt_path")
        if path is not None and str(path) == "last":
            path = self._find_last(subcommand)
            rank_zero_info(f"--ckpt_path last: {path}")
        if not path or str(path) in SPECIAL_PATHS or is_sharded_checkpoint(str(path)):
            return  # Lightning resolves "best" and "hpc", and loads sharded folders as a whole
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

    def _find_last(self, subcommand: str) -> str:
        """The file ``--ckpt_path last`` means (:func:`find_last_checkpoint`), put in the config;
        refused when there is none."""
        trainer = self.config[subcommand]["trainer"]
        root = str(trainer.get("default_root_dir") or "runs")
        name: str | None = "lightning_logs"
        logger = trainer.get("logger")
        if isinstance(logger, list):
            logger = logger[0] if logger else False
        if logger is False:
            name = None
        elif logger not in (None, True):
            init = logger.get("init_args") or {}
            root = str(init.get("save_dir") or root)
            name = init.get("name", name)
        dirpaths = tuple(
            str(cb["init_args"]["dirpath"])
            for cb in _callbacks(trainer)
            if hasattr(cb, "get") and (cb.get("init_args") or {}).get("dirpath")
        )
        found = find_last_checkpoint(root, name, dirpaths)
        if found is None:
            where = os.path.join(root, name, "version_*") if name else root
            self.parser.error(
                f"--ckpt_path last: no last.ckpt in {os.path.join(where, 'checkpoints')}"
                + (f" or {', '.join(dirpaths)}" if dirpaths else "")
                + " (trainer.default_root_dir). Pass the checkpoint file to resume from, or "
                "leave --ckpt_path out to start a new run."
            )
        self.config[subcommand]["ckpt_path"] = found
        return found

    def before_instantiate_classes(self) -> None:
        if self.subcommand in OWN_COMMANDS:
            self.parser.error(
                f"`cppo {self.subcommand}` runs from the `cppo` console script; from Python call "
                f"cppo_lightning.{_OWN_MODULES[self.subcommand]}.main."
            )
        if self.subcommand == "fit":
            _check_bounded(self.config["fit"]["trainer"])
        if self.subcommand in ("fit", "validate"):
            # Before any model loads: Lightning's logger would fail in a 30-frame traceback.
            root = self.config[self.subcommand]["trainer"].get("default_root_dir") or "runs"
            try:
                check_writable(str(root), "trainer.default_root_dir")
            except ConfigError as error:
                self.parser.error(str(error))

    def before_fit(self) -> None:
        # Where the run's files go, before the data and the model load (RunSummary).
        for callback in getattr(self.trainer, "callbacks", []):  # set by Lightning, not declared
            if isinstance(callback, RunSummary):
                callback.announce(self.trainer)

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
        if self.subcommand == "fit" and not any(
            isinstance(cb, RunSummary) for cb in _callbacks(trainer_config)
        ):
            # Last, so its end-of-run lines follow the export's; every `cppo fit` says where its
            # results went (a config may list its own RunSummary instead).
            always.append(RunSummary())
        trainer = self._instantiate_trainer(trainer_config, always)
        install_atomic_checkpoints(trainer)  # checkpoint files are whole or absent
        if self.subcommand is None:
            return trainer  # only built (`main(..., run=False)`): nothing will be written
        # Before anything writes: this run's own version_N, whatever other runs start with it.
        claim_log_versions(trainer)
        if self.subcommand == "fit" and trainer.global_rank == 0:
            self._remove_stale_temporaries(trainer)
        return trainer

    def _remove_stale_temporaries(self, trainer: Trainer) -> None:
        """Checkpoint writes left unfinished by killed runs of this root: in the checkpoint folders
        of its version folders and in the folder of ``--ckpt_path`` (a resumed run writes into a
        new version folder, so its writer would never see them)."""
        folders = {os.path.join(trainer.default_root_dir, "checkpoints")}
        for logger in trainer.loggers:
            root = getattr(logger, "root_dir", None)
            if root and os.path.isdir(root):
                folders |= {os.path.join(root, name, "checkpoints") for name in os.listdir(root)}
        path = self.config["fit"].get("ckpt_path")
        if path and os.path.isfile(str(path)):
            folders.add(os.path.dirname(os.path.abspath(str(path))))
        for folder in sorted(folders):
            remove_stale_temporaries(folder)


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


def _callbacks(trainer_config: Any) -> list[Any]:
    """``trainer.callbacks`` as a list (the config may hold one callback, a list, or none)."""
    callbacks = trainer_config.get("callbacks") or []
    return callbacks if isinstance(callbacks, list) else [callbacks]


def _wants_default_progress_bar(trainer_config: dict[str, Any]) -> bool:
    """The bar counts optimizer steps (:class:`RunProgressBar`) unless the config turns the bar
    off or lists a progress bar of its own."""
    from lightning.pytorch.callbacks import ProgressBar

    if trainer_config.get("enable_progress_bar") is False:
        return False
    return not any(isinstance(cb, ProgressBar) for cb in _callbacks(trainer_config))


def _leave_out_checkpoints(trainer_config: dict[str, Any]) -> None:
    """``trainer.enable_checkpointing=false`` with a config that lists a ModelCheckpoint (as
    configs/base.yaml does) is the user asking for no checkpoints: the callback is left out, and
    said so, instead of Lightning refusing the combination."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    callbacks = _callbacks(trainer_config)
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
    quiet_upstream_notices()
    return CPPOCLI(
        CPPOModule,
        VisionLanguageDataModule,
        parser_class=CPPOArgumentParser,
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
            "Face checkpoint, `cppo evaluate MODEL --eval SET` scores a model on evaluation sets, "
            "`cppo study --config CONFIG --methods ... --seeds ...` compares methods x seeds."
        },
        auto_configure_optimizers=False,
    )


def entry_point() -> None:
    """The ``cppo`` console script: like :func:`main`, returning nothing (a returned object would
    become the process's exit status). ``cppo export CKPT OUT`` writes a standalone Hugging Face
    checkpoint (:mod:`cppo_lightning.export`); ``cppo evaluate MODEL --eval SET ...`` scores a
    model on evaluation sets (:mod:`cppo_lightning.evaluation.command`); ``cppo study ...``
    trains and evaluates methods x seeds and compares them (:mod:`cppo_lightning.study.command`):
    its exit status is 1 when a run failed.

    A setting refused before training starts (:func:`is_configuration_error`: e.g. a negative
    ``model.kl_coef``, a train split smaller than one batch) is printed alone, without the
    traceback, and the exit status is 2, as for the parser's own errors. Set
    ``CPPO_TRACEBACK=1`` to see the traceback.

    The working directory goes first on ``sys.path`` (:func:`import_working_directory`), so
    rewards, components and callbacks in the user's own package import by dotted path.
    """
    import_working_directory()
    quiet_upstream_notices()
    if sys.argv[1:2] == ["export"]:
        from cppo_lightning.export import main as export_main

        export_main(sys.argv[2:])
        return
    if sys.argv[1:2] == ["evaluate"]:
        from cppo_lightning.evaluation.command import main as evaluate_main

        evaluate_main(sys.argv[2:])
        return
    if sys.argv[1:2] == ["study"]:
        from cppo_lightning.study.command import main as study_main

        try:
            status = study_main(sys.argv[2:])
        except ConfigError as error:
            if os.environ.get("CPPO_TRACEBACK"):
                raise
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(2) from None
        raise SystemExit(status)
    try:
        main()
    except ValueError as error:
        if not is_configuration_error(error) or os.environ.get("CPPO_TRACEBACK"):
            raise
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def import_working_directory() -> None:
    """Put the working directory first on ``sys.path``, as ``python -m`` does (a console script
    gets its own folder, the venv's ``bin/``, instead): ``mypkg.rewards.f`` imports from
    ``./mypkg/rewards.py`` as it would under ``python -m`` or pytest. Nothing is added when it is
    already there (``''`` stands for it)."""
    cwd = os.getcwd()
    here = os.path.realpath(cwd)
    if not any(os.path.realpath(entry or cwd) == here for entry in sys.path):
        sys.path.insert(0, cwd)


class _DropLitLoggerTip(logging.Filter):
    """Lightning's Trainer logs a tip to install litlogger on every run without a LitLogger
    (``logger_connector.configure_logger``, lightning 2.6), with no setting to turn it off: an
    advertisement, not something a user of this command can act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "try installing [litlogger]" not in record.getMessage()


def quiet_upstream_notices() -> None:
    """Drop the two messages Lightning prints on every run that a user cannot act on, each by its
    exact text (everything else still shows):

    - the litlogger tip (:class:`_DropLitLoggerTip`);
    - torch 2.13's FutureWarning on ``LeafSpec()``, which Lightning's own
      ``utilities/_pytree.py`` calls for every dataloader (Lightning-AI/pytorch-lightning#21326;
      lightning 2.6.6 still does). Our code makes no such call.
    """
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        rank_zero = logging.getLogger(name)  # rank_zero_info's logger (fabric's or pytorch's)
        if not any(isinstance(f, _DropLitLoggerTip) for f in rank_zero.filters):
            rank_zero.addFilter(_DropLitLoggerTip())
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )


def is_configuration_error(error: BaseException) -> bool:
    """Whether ``error`` is this project refusing a setting before training starts, rather than a
    bug: a :class:`ConfigError`, or a ``ValueError`` raised by a ``raise`` statement of this
    package (a constructor's or a setup hook's check) before Lightning ran its first step or
    validation (``Trainer._run_stage``). A ValueError from torch, transformers or Python itself
    (e.g. an unpacking error) keeps its traceback."""
    frames: list[TracebackType] = []
    tb = error.__traceback__
    while tb is not None:
        frames.append(tb)
        tb = tb.tb_next
    if any(frame.tb_frame.f_code.co_name == "_run_stage" for frame in frames):
        return False  # raised while training or validating
    if isinstance(error, ConfigError):
        return True
    if not frames:
        return False
    last = frames[-1]
    package = os.path.dirname(os.path.abspath(__file__))
    filename = os.path.abspath(last.tb_frame.f_code.co_filename)
    line = linecache.getline(filename, last.tb_lineno).strip()
    return filename.startswith(package + os.sep) and line.startswith("raise ")


if __name__ == "__main__":
    entry_point()
