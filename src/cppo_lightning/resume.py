"""Settings on resume: what the user passes wins, or the run refuses.

LightningCLI, given ``--ckpt_path``, re-applies the checkpoint's stored hyper-parameters over the
command line and config files, so ``--model.kl_coef 0.0`` on resume trained with the old value
while ``--print_config`` showed the new one. ``cppo`` instead reads the checkpoint first
(:func:`read_checkpoint`, which turns a corrupt or foreign file into an error that names it), then
compares its settings with the user's (:func:`compare_settings`):

- a setting that decides which weights the checkpoint holds (:data:`FIXED_SETTINGS`: the model,
  its dtype, what is frozen, the LoRA shape) must be unchanged: a difference is refused before any
  model loads, naming the key and both values;
- any other difference is the user's choice: it is applied and logged (``resume: model.kl_coef =
  0.0 (the checkpoint's run had 0.01)``).

The optimizer's settings live in its saved state rather than in the hyper-parameters: Lightning
restores them over the configured ones, so :func:`apply_configured_optimizer_settings` puts the
configured values (learning rate, weight decay, betas, ...) back after the restore.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from cppo_lightning.checkpoints import UnreadableCheckpoint, load_checkpoint_file
from cppo_lightning.errors import ConfigError

# Checkpoint paths Lightning resolves itself (``trainer.fit(ckpt_path="last")``); ``cppo`` finds
# "last" itself (:func:`find_last_checkpoint`).
SPECIAL_PATHS = ("last", "best", "hpc", "registry")

# What marks a folder as one sharded checkpoint: FSDP's and ModelParallel's ``meta.pt`` (and
# torch.distributed.checkpoint's ``.metadata``), DeepSpeed's ``checkpoint/`` folder.
SHARDED_FILES = ("meta.pt", ".metadata")
SHARDED_FOLDERS = ("checkpoint",)

# Settings that decide which weights (and optimizer state) a checkpoint holds: resuming with
# another value is refused. LoRA's alpha and dropout only scale and regularise the same weights.
FIXED_SETTINGS = ("model_name_or_path", "dtype", "freeze_vision_tower", "freeze_projector")
FIXED_LORA_SETTINGS = ("r", "target_modules", "exclude_modules", "adapt_vision")


class CheckpointError(ConfigError):
    """A ``--ckpt_path`` that cannot be resumed from, or settings that cannot change on resume."""


@dataclass(frozen=True)
class Change:
    """A setting whose value on resume differs from the checkpoint's run."""

    key: str
    stored: Any
    given: Any

    def __str__(self) -> str:
        return f"{self.key} = {self.given!r} (the checkpoint's run had {self.stored!r})"


def is_sharded_checkpoint(path: str) -> bool:
    """Whether ``path`` is a folder that holds one sharded checkpoint (DeepSpeed, sharded FSDP),
    which Lightning loads as a whole."""
    return os.path.isdir(path) and (
        any(os.path.isfile(os.path.join(path, name)) for name in SHARDED_FILES)
        or any(os.path.isdir(os.path.join(path, name)) for name in SHARDED_FOLDERS)
    )


def _folder_error(path: str) -> CheckpointError:
    """The refusal of a ``--ckpt_path`` folder that is not a sharded checkpoint, listing the
    ``.ckpt`` files under it (newest first)."""
    found = []
    for folder, _, names in os.walk(path):
        found += [os.path.join(folder, name) for name in names if name.endswith(".ckpt")]
    found.sort(key=lambda file: (-os.path.getmtime(file), file))
    listed = ", ".join(os.path.relpath(file, path) for file in found[:8])
    if len(found) > 8:
        listed += f" ({len(found) - 8} more)"
    holds = f"its .ckpt files: {listed}" if found else "it holds no .ckpt file"
    return CheckpointError(
        f"--ckpt_path {path}: a folder, not a checkpoint file (nor a sharded checkpoint: no "
        f"{' or '.join((*SHARDED_FILES, *(f + '/' for f in SHARDED_FOLDERS)))} in it); "
        f"{holds}. Pass one file, e.g. --ckpt_path "
        f"{os.path.join(path, os.path.relpath(found[0], path)) if found else '<file>.ckpt'}."
    )


def find_last_checkpoint(
    root_dir: str, logger_name: str | None = "lightning_logs", dirpaths: tuple[str, ...] = ()
) -> str | None:
    """The ``last.ckpt`` that ``--ckpt_path last`` means: in a configured checkpoint folder
    (``dirpaths``), else in the newest ``version_N`` folder under ``root_dir/logger_name`` that
    has one, else in ``root_dir/checkpoints`` (a run without a logger); None if there is none.

    Lightning looks only in the new run's own (empty) version folder, warns, and trains from
    step 0."""
    for folder in dirpaths:
        if os.path.isfile(os.path.join(folder, "last.ckpt")):
            return os.path.join(folder, "last.ckpt")
    if logger_name is not None:
        logs = os.path.join(root_dir, logger_name) if logger_name else root_dir
        versions = []
        if os.path.isdir(logs):
            for name in os.listdir(logs):
                number = name.removeprefix("version_")
                if name.startswith("version_") and number.isdigit():
                    versions.append((int(number), name))
        for _, name in sorted(versions, reverse=True):
            candidate = os.path.join(logs, name, "checkpoints", "last.ckpt")
            if os.path.isfile(candidate):
                return candidate
    candidate = os.path.join(root_dir, "checkpoints", "last.ckpt")
    return candidate if os.path.isfile(candidate) else None


def read_checkpoint(path: str, subcommand: str) -> dict[str, Any]:
    """Load the checkpoint file ``path`` on the CPU, refusing with the file's name (and what to do)
    a missing file, a folder (listing the checkpoints in it), one that does not load (truncated,
    corrupt, not written by ``torch.save``) and one that is not a checkpoint of ``cppo fit``.
    ``fit`` also needs the training state that a weights-only checkpoint lacks."""
    if os.path.isdir(path):
        raise _folder_error(path)
    if not os.path.isfile(path):
        raise CheckpointError(
            f"--ckpt_path {path}: no such file. Pass a .ckpt file written by cppo fit (its "
            "checkpoints are under <trainer.default_root_dir>/lightning_logs/version_*/"
            "checkpoints/)."
        )
    try:
        # Memory-mapped: the settings need none of its tensors, so none is read here.
        checkpoint = load_checkpoint_file(path, weights_only=True, mmap=True)
    except UnreadableCheckpoint as error:
        raise CheckpointError(
            f"--ckpt_path {path}: the file does not load as a checkpoint ({error}). It is "
            "truncated or corrupt, or not a file torch.save wrote; resume from another "
            "checkpoint of the run (e.g. the one before it, or last.ckpt)."
        ) from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        kind = (
            f"a dict with keys {sorted(map(str, checkpoint))[:6]}"
            if isinstance(checkpoint, dict)
            else type(checkpoint).__name__
        )
        raise CheckpointError(
            f"--ckpt_path {path}: not a Lightning checkpoint (it holds {kind}, no 'state_dict'). "
            "Pass a .ckpt file written by cppo fit; to start from other weights, set "
            "model.model_name_or_path instead."
        )
    settings = checkpoint.get("hyper_parameters") or {}
    if "model_name_or_path" not in settings:
        raise CheckpointError(
            f"--ckpt_path {path}: a Lightning checkpoint, but not one of cppo fit (its "
            "hyper-parameters name no model.model_name_or_path). Pass a .ckpt file written by "
            "cppo fit."
        )
    if subcommand == "fit" and not ("optimizer_states" in checkpoint and "loops" in checkpoint):
        raise CheckpointError(
            f"--ckpt_path {path}: a weights-only checkpoint (no optimizer state or loop "
            "counters), which `cppo fit` cannot resume. Resume from a full checkpoint, or "
            "evaluate this one with `cppo validate --ckpt_path ...`."
        )
    return checkpoint


def _plain(value: Any) -> Any:
    """A setting as YAML would write it (dataclasses and namespaces as dicts, tuples as lists),
    so stored and given values compare equal when they mean the same."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    elif hasattr(value, "__dataclass_fields__"):
        import dataclasses

        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def compare_settings(stored: dict[str, Any], given: dict[str, Any], path: str) -> list[Change]:
    """The ``model.*`` settings that differ between the checkpoint's run (``stored``, its
    hyper-parameters) and this one (``given``). Raises :class:`CheckpointError` naming every
    :data:`FIXED_SETTINGS` (and LoRA shape) difference with both values; returns the others."""
    stored, given = _plain(stored), _plain(given)
    changes = [
        Change(f"model.{key}", stored[key], given.get(key))
        for key in sorted(stored)
        if key in given and stored[key] != given[key]
    ]
    refused: list[Change] = []
    allowed: list[Change] = []
    for change in changes:
        key = change.key.removeprefix("model.")
        if key in FIXED_SETTINGS:
            refused.append(change)
        elif key == "lora":
            before, after = change.stored, change.given
            if before is None or after is None:
                refused.append(change)
                continue
            for field in sorted(set(before) | set(after)):
                pair = Change(f"model.lora.{field}", before.get(field), after.get(field))
                if pair.stored != pair.given:
                    (refused if field in FIXED_LORA_SETTINGS else allowed).append(pair)
        else:
            allowed.append(change)
    if refused:
        lines = "\n".join(
            f"  {c.key}: the checkpoint's run had {c.stored!r}, this run has {c.given!r}"
            for c in refused
        )
        raise CheckpointError(
            f"cannot resume from {path} with these settings changed:\n{lines}\nThey decide which "
            "weights the checkpoint (and its optimizer state) holds. Resume with the checkpoint's "
            "values, or start a new run from its weights (`cppo export` the checkpoint, then set "
            "model.model_name_or_path to the exported folder)."
        )
    return allowed


def configured_optimizer_settings(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Every parameter group's settings as configured (all but its parameters), to put back
    after Lightning restores the checkpoint's."""
    return [
        {key: value for key, value in group.items() if key not in ("params", "initial_lr")}
        for group in optimizer.param_groups
    ]


def apply_configured_optimizer_settings(
    optimizer: torch.optim.Optimizer, configured: list[dict[str, Any]], schedulers: list[Any]
) -> list[Change]:
    """Put the configured settings back into ``optimizer``'s groups after a restore; returns what
    differed from the checkpoint's. A changed learning rate under a scheduler becomes the new base
    rate (``initial_lr`` and the scheduler's ``base_lrs``) and rescales the current rate by the
    same ratio, so the schedule continues from the user's rate."""
    changes: list[Change] = []
    for index, (group, wanted) in enumerate(zip(optimizer.param_groups, configured, strict=True)):
        for key, value in wanted.items():
            if key == "lr":
                base = group.get("initial_lr", group["lr"])
                if base == value:
                    continue
                changes.append(Change(f"optimizer lr (group {index})", base, value))
                current = group["lr"]
                group["lr"] = value if current == base or not base else current * (value / base)
                if "initial_lr" in group:
                    group["initial_lr"] = value
                for scheduler in schedulers:
                    base_lrs = getattr(scheduler, "base_lrs", None)
                    if base_lrs is not None and index < len(base_lrs):
                        base_lrs[index] = value
            elif key in group and _plain(group[key]) != _plain(value):
                changes.append(Change(f"optimizer {key} (group {index})", group[key], value))
                group[key] = value
    return changes
