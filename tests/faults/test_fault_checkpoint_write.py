"""Checkpoint files are whole or absent: a write that fails half way leaves no file under the
checkpoint's name (an older one stays as it was) and no temporary file; too little free space is
refused before writing, naming the sizes."""

from __future__ import annotations

import os
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
