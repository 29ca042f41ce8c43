"""A run's folder, ``<trainer.default_root_dir>/lightning_logs/version_N``: one per run, writable.

Lightning's TensorBoard and CSV loggers pick ``version_N`` by listing the folders already there,
the first time the version is asked for. Two runs started together with the same root can both
list before either has created its folder: they then write into one folder (the config.yaml of
one, the hparams.yaml of the other, interleaved checkpoints, one hf_policy/ over the other, both
curves in one TensorBoard run) and both exit 0. Here global rank 0 claims the folder when the
trainer is built, with ``os.mkdir``, which fails when the folder exists (the next number is then
tried), and pins the logger's version to it. The processes Lightning's launcher starts for the
other ranks inherit the claim (an environment variable); ranks started otherwise (torchrun,
SLURM) take rank 0's folder from Lightning's broadcasts of ``trainer.log_dir`` and of the
checkpoint folder, as before.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from typing import Any

from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from cppo_lightning.errors import ConfigError

# Set by rank 0 for the processes it starts: {"pid": rank 0's pid, "versions": {root: N}}.
_CLAIMED = "CPPO_CLAIMED_LOG_VERSIONS"
_VERSION = re.compile(r"version_(\d+)")


def is_local(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is on a local file system (not ``s3://`` and the like)."""
    protocol = get_filesystem(os.fspath(path)).protocol
    return "file" in ((protocol,) if isinstance(protocol, str) else protocol)


def check_writable(folder: str | os.PathLike[str], setting: str) -> None:
    """Refuse a folder this process cannot create files in (read-only, or under a file), naming
    ``setting``, before anything is loaded. The folder is created if it is missing."""
    folder = os.fspath(folder)
    if not is_local(folder):
        return
    try:
        os.makedirs(folder, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".cppo-write-check.", dir=folder)
        os.close(handle)
        os.remove(probe)
    except OSError as error:
        raise ConfigError(
            f"{setting}={folder} cannot be written ({error.strerror or error}): set {setting} "
            "to a folder this user can create files in."
        ) from error


def claim_version(root: str | os.PathLike[str]) -> int:
    """Create ``root/version_N`` for the lowest N above the versions listed there, and return N.
    ``os.mkdir`` fails if another run created that folder since the listing: the next N is then
    tried, so two runs never get the same folder, whatever the timing."""
    root = os.fspath(root)
    os.makedirs(root, exist_ok=True)
    listed = [int(m.group(1)) for name in os.listdir(root) if (m := _VERSION.fullmatch(name))]
    version = max(listed, default=-1) + 1
    while True:
        try:
            os.mkdir(os.path.join(root, f"version_{version}"))
        except FileExistsError:
            version += 1
            continue
        return version


def claim_log_versions(trainer: Trainer) -> None:
    """Pin the version of every TensorBoard/CSV logger of ``trainer`` that has none (the default
    logger included) to a folder claimed by :func:`claim_version` on global rank 0; loggers
    that share a root share the claim. A folder that cannot be created is refused naming it."""
    inherited = _inherited_versions() if trainer.global_rank != 0 else {}
    claimed: dict[str, int] = {}
    for logger in trainer.loggers:
        if not isinstance(logger, (TensorBoardLogger, CSVLogger)) or _pinned(logger):
            continue
        root = os.path.abspath(logger.root_dir)
        if not is_local(logger.root_dir):
            continue  # remote folders keep Lightning's way
        if trainer.global_rank != 0:
            if root in inherited:
                _pin(logger, inherited[root])
            continue
        if root not in claimed:
            try:
                claimed[root] = claim_version(root)
            except OSError as error:
                raise ConfigError(
                    f"cannot create the run folder in {root} ({error.strerror or error}): set "
                    "trainer.default_root_dir (or the logger's save_dir) to a folder this user "
                    "can write to."
                ) from error
        _pin(logger, claimed[root])
    if claimed:
        os.environ[_CLAIMED] = json.dumps({"pid": os.getpid(), "versions": claimed})


def _pinned(logger: Any) -> bool:
    # A version given in the config (or SLURM's job id, for the default logger) stands.
    return getattr(logger, "_version", None) is not None


def _pin(logger: Any, version: int) -> None:
    # The loggers take a version only in their constructor; `_version` is what it sets.
    logger._version = version


def _inherited_versions() -> dict[str, int]:
    """The versions rank 0 claimed, when this process is one its launcher started."""
    try:
        record = json.loads(os.environ.get(_CLAIMED, ""))
    except ValueError:
        return {}
    if not isinstance(record, dict) or record.get("pid") != os.getppid():
        return {}  # set by an unrelated process (e.g. a run earlier in the parent)
    return {str(k): int(v) for k, v in record.get("versions", {}).items()}
