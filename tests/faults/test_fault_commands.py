"""The commands a user types do what their help says, or refuse saying what to change:
`cppo export` into a non-empty folder, `cppo --help`, `cppo validate`, `cppo fit` without a
length, `--trainer.enable_checkpointing false`."""

from __future__ import annotations

from pathlib import Path

import pytest

from cppo_lightning.cli import CPPOCLI, main
from cppo_lightning.export import main as export_main
from tests.helpers.runs import fit_args


def _checkpoint(uninterrupted: tuple[Path, dict], step: int = 2) -> Path:
    root, _ = uninterrupted
    (checkpoint,) = root.rglob(f"step={step}.ckpt")
    return checkpoint


def test_export_into_a_non_empty_folder_is_refused(tmp_path, uninterrupted, capsys):
    """Promise: `cppo export CKPT OUT` with files in OUT stops (before loading anything) naming
    the folder and --overwrite; the files stay as they were."""
    output = tmp_path / "exported"
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as raised:
        export_main([str(_checkpoint(uninterrupted)), str(output)])
    assert raised.value.code == 2
    message = capsys.readouterr().err
    assert "is not empty" in message and "--overwrite" in message
    assert [p.name for p in output.iterdir()] == ["notes.txt"]


def test_export_overwrite_replaces_the_folder_with_a_whole_export(tmp_path, uninterrupted):
    """Promise: with --overwrite the folder holds the new export only (written next to it and
    renamed into place), and no staging folder is left behind."""
    output = tmp_path / "exported"
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    export_main([str(_checkpoint(uninterrupted)), str(output), "--overwrite"])
    names = sorted(p.name for p in output.iterdir())
    assert "notes.txt" not in names
    assert "config.json" in names
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]


def test_export_of_a_corrupt_checkpoint_names_the_file(tmp_path, capsys):
    """Promise: `cppo export` of a file that is not a checkpoint says so with its name."""
    broken = tmp_path / "broken.ckpt"
    broken.write_text("not a checkpoint")
    with pytest.raises(SystemExit):
        export_main([str(broken), str(tmp_path / "out")])
    assert f"{str(broken)!r} does not load as a checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_help_lists_only_the_commands_that_work(capsys):
    """Promise: `cppo --help` offers fit, validate, evaluate, export and study (its usage line
    lists all five; it listed only {fit,validate}), not Lightning's test and predict, which this
    module has no steps for; `cppo test` is refused by the parser."""
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "{fit,validate,evaluate,export,study}" in text.splitlines()[0]
    assert "cppo export CKPT OUT" in text and "cppo evaluate MODEL" in text
    with pytest.raises(SystemExit) as raised:
        main(["test", "--trainer.logger=false"])
    assert raised.value.code == 2


def test_validate_prints_its_metrics(tmp_path, uninterrupted, capsys):
    """Promise: `cppo validate --ckpt_path CKPT` prints the held-out metrics (Lightning prints
    only what is logged to the logger, and validation metrics were not)."""
    args = fit_args(tmp_path, f"--ckpt_path={_checkpoint(uninterrupted)}")
    args[0] = "validate"
    args = [a for a in args if not a.startswith(("--trainer.max_steps", "--trainer.val_check"))]
    cli = main(args)
    out = capsys.readouterr().out
    assert "val/accuracy" in out and "val/reward" in out
    assert "val/accuracy" in cli.trainer.logged_metrics


def test_fit_without_a_length_is_refused_before_anything_is_built(monkeypatch, capsys):
    """Promise: `cppo fit` with no max_steps, max_epochs or max_time (e.g. no --config) is
    refused, pointing at configs/base.yaml and --trainer.max_steps, instead of training for
    Lightning's 1000 epochs."""

    def built(self):  # type: ignore[no-untyped-def]
        raise AssertionError("the model and data were built before the run was refused")

    monkeypatch.setattr(CPPOCLI, "instantiate_classes", built)
    with pytest.raises(SystemExit) as raised:
        main(["fit", "--trainer.logger=false"])
    assert "the run has no length" in str(raised.value.code)
    assert "--trainer.max_steps" in str(raised.value.code)


def test_checkpointing_off_leaves_out_the_configs_checkpoint_callback(tmp_path):
    """Promise: `--trainer.enable_checkpointing false` with configs/base.yaml (which lists a
    ModelCheckpoint) trains and writes no checkpoint, instead of Lightning's refusal of the
    combination."""
    cli = main(fit_args(tmp_path, "--trainer.enable_checkpointing=false", steps=1))
    assert cli.trainer.global_step == 1
    assert cli.trainer.checkpoint_callback is None
    assert not list(tmp_path.rglob("*.ckpt"))


def test_with_checkpointing_off_a_sigterm_saves_nothing_and_still_exits_143(tmp_path, caplog):
    """Promise: with `--trainer.enable_checkpointing false` a SIGTERM writes no checkpoint (the
    user asked for none), says so, and still exits 143."""
    with pytest.raises(SystemExit) as exited, caplog.at_level("INFO"):
        main(
            fit_args(
                tmp_path,
                "--trainer.enable_checkpointing=false",
                "--trainer.callbacks+=tests.helpers.signals.SigtermAt",
                "--trainer.callbacks.step=1",
                steps=3,
            )
        )
    assert exited.value.code == 143
    assert "nothing saved: checkpointing is off" in caplog.text
    assert not list(tmp_path.rglob("*.ckpt"))
