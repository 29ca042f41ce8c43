"""What a checkpoint holds beyond Lightning's own state, and how it is written.

A resumed run continues the run it was: next to the weights, optimizer, schedules and loop
counters (Lightning's), a checkpoint holds every rank's random-number states
(:func:`gather_rng_states`, restored by :func:`restore_rng_states`) and the train loader's
position (:mod:`cppo_lightning.data.loader`).

A checkpoint file is whole or absent (:class:`AtomicCheckpointIO`): it is written to a temporary
file in its own folder, after a free-space check, and renamed into place. A temporary left by a
process that was killed while writing is removed on the next start
(:func:`remove_stale_temporaries`).
"""

from __future__ import annotations

import io
import os
import random
import re
import shutil
import socket
import tempfile
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch import Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn


class UnreadableCheckpoint(ValueError):
    """A file ``torch.load`` cannot read (truncated, corrupt, not written by ``torch.save``); the
    message is the loader's error, for callers to put in their own words."""


def load_checkpoint_file(path: str | os.PathLike[str], *, weights_only: bool, mmap: bool) -> Any:
    """``torch.load`` onto the CPU (``mmap``: tensors are read only when touched). Every way the
    loader fails on a bad file (zip, pickle, EOF and runtime errors) becomes
    :class:`UnreadableCheckpoint`."""
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=mmap)
    except Exception as error:
        first = str(error).splitlines()[0] if str(error) else ""
        raise UnreadableCheckpoint(f"{type(error).__name__}: {first}") from error


def rng_states() -> dict[str, Any]:
    """This process's torch (CPU and every CUDA device), numpy and python generator states,
    as tensors and plain values (so a ``weights_only`` load reads them)."""
    kind, keys, position, has_gauss, gauss = np.random.get_state(legacy=True)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [
            kind,
            torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            position,
            has_gauss,
            gauss,
        ],
        "python": random.getstate(),
    }


def set_rng_states(states: dict[str, Any]) -> None:
    """Puts back what :func:`rng_states` returned."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    random.setstate(states["python"])


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's :func:`rng_states`, by rank (a collective: every rank must call it)."""
    mine = rng_states()
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


def restore_rng_states(states: list[dict[str, Any]] | None, rank: int, world_size: int) -> None:
    """Sets this rank's generators to the states the checkpoint saved for it.

    A checkpoint from another number of processes cannot continue exactly; the run goes on
    from the generators as they are, and says so.
    """
    if states is None:
        rank_zero_warn(
            "the checkpoint holds no random-number states (written before they were saved): "
            "the resumed run will not repeat the steps an uninterrupted run would have taken."
        )
        return
    if len(states) != world_size:
        rank_zero_warn(
            f"the checkpoint was written by {len(states)} processes and this run has "
            f"{world_size}: it continues, but not as the interrupted run would have (resume on "
            f"{len(states)} processes for an exact continuation)."
        )
        return
    set_rng_states(states[rank])


def current_umask() -> int:
    """This process's umask: from ``/proc`` where there is one (reading it by setting it would
    change it for a moment for every thread), else by setting it and setting it back."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# A writer's temporary: `.<checkpoint name>.<pid>@<host>.<random>.tmp` in the checkpoint's folder.
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)@(?P<host>[^.]+)\.[^.]+\.tmp")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def _temporary_prefix(path: str) -> str:
    return f".{os.path.basename(path)}.{os.getpid()}@{_host()}."


# Temporaries this process is writing now (an asynchronous checkpoint IO writes from a thread).
_WRITING: set[str] = set()


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # its temporaries are left over unless being written (`_WRITING`)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> list[str]:
    """Remove the temporary checkpoint files in ``folder`` that a writer on this host left when it
    was killed mid-write, and return their paths: those of a process that is gone, and those of
    this process's id (a restarted container often gets its old process id) that it is not
    writing now. Another live process's temporary is never touched, nor one written from another
    host (its process cannot be checked from here)."""
    folder = os.path.abspath(folder)
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    removed = []
    host = _host()
    for name in names:
        match = _TEMPORARY.fullmatch(name)
        path = os.path.join(folder, name)
        if match is None or match["host"] != host or _alive(int(match["pid"])) or path in _WRITING:
            continue
        try:
            os.remove(path)
        except FileNotFoundError:
            continue
        removed.append(path)
    for path in removed:
        rank_zero_info(f"removed {path}: a checkpoint write that its process did not finish")
    return removed


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temporary file in the checkpoint's own folder, renamed into place.

    Lightning's default writes through an fsspec transaction that stages the file in the system
    temp folder and copies it: a full disk leaves a truncated file under the checkpoint's name,
    and a 7B run needs a checkpoint's size free outside its run folder. Here the bytes are
    serialised first, the destination's free space is checked against their size (a clear error
    before anything is written), and a failed write removes its temporary file, leaving any
    earlier checkpoint of that name as it was. Remote paths (``s3://`` ...) keep Lightning's way.

    The temporary's name holds the writer's process id and host, so that the temporaries of a
    process killed mid-write are removed the first time a writer uses that folder again
    (:func:`remove_stale_temporaries`). The file gets the permissions of any file this process
    creates (``0o666`` less the umask), not ``mkstemp``'s private ``0o600``.
    """

    def __init__(self) -> None:
        super().__init__()
        self._swept: set[str] = set()

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        protocol = get_filesystem(path).protocol
        local = "file" in ((protocol,) if isinstance(protocol, str) else protocol)
        if storage_options is not None or not local:
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        if folder not in self._swept:
            remove_stale_temporaries(folder)
            self._swept.add(folder)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        size = buffer.getbuffer().nbytes
        free = shutil.disk_usage(folder).free
        if free < size:
            raise OSError(
                f"not enough free space to write the checkpoint {path!r}: it needs "
                f"{size / 2**20:.1f} MiB and {folder!r} has {free / 2**20:.1f} MiB free. Free "
                "space there, or point trainer.default_root_dir (or the ModelCheckpoint dirpath) "
                "at a larger disk."
            )
        handle, temporary = tempfile.mkstemp(
            prefix=_temporary_prefix(path), suffix=".tmp", dir=folder
        )
        _WRITING.add(temporary)
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(buffer.getbuffer())
                file.flush()
                os.fsync(file.fileno())
            os.chmod(temporary, 0o666 & ~current_umask())
            os.replace(temporary, path)
        except BaseException:
            if os.path.exists(temporary):
                os.remove(temporary)
            raise
        finally:
            _WRITING.discard(temporary)


def install_atomic_checkpoints(trainer: Trainer) -> None:
    """Make the trainer write checkpoint files through :class:`AtomicCheckpointIO`, unless a
    plugin or strategy chose its own checkpoint IO (DeepSpeed's and sharded FSDP's write
    folders of their own)."""
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
