"""Checkpoint files are whole or absent: a write that fails half way leaves no file under the
checkpoint's name (an older one stays as it was) and no temporary file; too little free space is
refused before writing, naming the sizes; a temporary left by a killed writer is removed on the
next start."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections import namedtuple

import pytest
import torch

from cppo_lightning import checkpoints
from cppo_lightning.checkpoints import AtomicCheckpointIO
from cppo_lightning.cli import main
from tests.helpers.runs import fit_args


class _HalfWrite(Exception):
    pass


def _fail_half_way(monkeypatch):
    """Make the next checkpoint write put half its bytes on disk, then raise."""
    real_fdopen = os.fdopen

    class Breaking:
        def __init__(self, file):
            self.file = file

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, data):
            self.file.write(bytes(data[: len(data) // 2]))
            self.file.flush()
            raise _HalfWrite("disk full")

    monkeypatch.setattr(checkpoints.os, "fdopen", lambda fd, mode: Breaking(real_fdopen(fd, mode)))


def test_a_write_that_fails_half_way_leaves_no_file_under_the_name(tmp_path, monkeypatch):
    """Half the bytes written, then an error: the folder holds neither the checkpoint's name
    nor the temporary file."""
    io = AtomicCheckpointIO()
    path = tmp_path / "ckpts" / "epoch=0-step=2.ckpt"
    _fail_half_way(monkeypatch)
    with pytest.raises(_HalfWrite):
        io.save_checkpoint({"w": torch.arange(1000)}, path)
    assert os.listdir(path.parent) == []


def test_a_failed_overwrite_keeps_the_older_checkpoint_whole(tmp_path, monkeypatch):
    """A failed write over an existing ``last.ckpt`` leaves the old file, loadable, unchanged."""
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"w": torch.arange(10)}, path)
    _fail_half_way(monkeypatch)
    with pytest.raises(_HalfWrite):
        io.save_checkpoint({"w": torch.arange(1000)}, path)
    assert os.listdir(tmp_path) == ["last.ckpt"]
    assert torch.equal(torch.load(path)["w"], torch.arange(10))


def test_too_little_free_space_is_refused_before_writing_with_the_sizes(tmp_path, monkeypatch):
    """Less free space in the destination than the checkpoint's size: an OSError naming both,
    and nothing written."""
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda folder: usage(10, 10, 100))
    with pytest.raises(OSError, match=r"needs .* MiB and .* has 0\.0 MiB free"):
        AtomicCheckpointIO().save_checkpoint({"w": torch.arange(1000)}, tmp_path / "a.ckpt")
    assert os.listdir(tmp_path) == []


def test_the_cli_trainer_writes_through_it_and_its_checkpoints_load(tmp_path):
    """`cppo fit` installs the atomic writer; the checkpoint it writes loads, and no temporary
    file is left beside it."""
    cli = main(fit_args(tmp_path, steps=1))
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    (folder,) = {os.path.dirname(p) for p in _ckpts(tmp_path)}
    assert all(not name.endswith(".tmp") for name in os.listdir(folder))
    for path in _ckpts(tmp_path):
        assert "state_dict" in torch.load(path, weights_only=False)


def _ckpts(root):
    return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".ckpt")]


def _dead_pid() -> int:
    """The id of a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _temporary(folder, pid: int, host: str | None = None) -> str:
    """A temporary as the writer names it (`.<name>.<pid>@<host>.<random>.tmp`)."""
    host = host or re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())
    path = os.path.join(folder, f".last.ckpt.{pid}@{host}.k2x8_q0a.tmp")
    with open(path, "wb") as file:
        file.write(b"half a checkpoint")
    return os.path.basename(path)


def test_a_killed_writers_temporary_is_removed_when_the_folder_is_written_again(tmp_path):
    """Promise: a temporary left by a process killed while writing a checkpoint is removed the
    next time a checkpoint is written to its folder; a live process's temporary (it is being
    written) and one from another host (its process cannot be checked) stay. It stayed forever,
    a checkpoint's size each."""
    dead = _temporary(tmp_path, _dead_pid())
    live = _temporary(tmp_path, os.getppid())
    elsewhere = _temporary(tmp_path, _dead_pid(), host="another-host")
    AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(2)}, tmp_path / "last.ckpt")
    names = set(os.listdir(tmp_path))
    assert dead not in names
    assert {live, elsewhere, "last.ckpt"} <= names


def test_a_new_run_removes_the_temporaries_killed_runs_left_in_its_root(tmp_path):
    """Promise: `cppo fit` removes, at start, the temporaries that killed runs left in the
    checkpoint folders of its root (a new or resumed run writes into a version folder of its
    own, so its writer never visits the old ones)."""
    old = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    old.mkdir(parents=True)
    dead = _temporary(old, _dead_pid())
    main(fit_args(tmp_path, steps=1))
    assert dead not in os.listdir(old)
