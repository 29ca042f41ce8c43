"""Settings on resume: the user's value wins where that is sound, and settings that decide which
weights a checkpoint holds are refused naming both values; a bad ``--ckpt_path`` file is refused
by name before any model loads."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from cppo_lightning.cli import main
from tests.helpers.runs import fit_args


def _checkpoint(uninterrupted: tuple[Path, dict], step: int = 2) -> Path:
    root, _ = uninterrupted
    (checkpoint,) = root.rglob(f"step={step}.ckpt")
    return checkpoint


def _refusal(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """Run ``cppo fit`` expecting a refusal at parse time; its message."""
    with pytest.raises(SystemExit) as raised:
        main(list(args))
    assert raised.value.code not in (0, None)
    return capsys.readouterr().err


def test_the_users_settings_win_on_resume_and_the_saved_config_equals_what_ran(
    tmp_path, uninterrupted, caplog
):
    """Promise: with `--ckpt_path ... --model.kl_coef 0.0 --model.optimizer.init_args.lr 2e-4`
    the run uses kl_coef 0.0 (module and hyper-parameters) and base learning rate 2e-4 (the
    optimizer and its cosine schedule after Lightning restored the checkpoint's), and its
    config.yaml records both. LightningCLI
    re-applied the checkpoint's kl_coef 0.01, and the restored optimizer state kept lr 1e-4."""
    with caplog.at_level("INFO"):
        cli = main(
            fit_args(
                tmp_path,
                f"--ckpt_path={_checkpoint(uninterrupted)}",
                "--model.kl_coef=0.0",
                "--model.optimizer.init_args.lr=2e-4",
                steps=3,
            )
        )
    assert "resume: model.kl_coef = 0.0 (the checkpoint's run had 0.01)" in caplog.text
    assert (
        "resume: optimizer lr (group 0) = 0.0002 (the checkpoint's run had 0.0001)" in caplog.text
    )
    assert cli.trainer.global_step == 3
    assert cli.model.kl_coef == 0.0
    assert cli.model.hparams.kl_coef == 0.0
    # base.yaml's cosine schedule continues from the new base rate: at step 3 of T_max=600.
    (group,) = cli.trainer.optimizers[0].param_groups
    assert group["initial_lr"] == 2e-4
    assert cli.trainer.lr_scheduler_configs[0].scheduler.base_lrs == [2e-4]
    assert group["lr"] == pytest.approx(2e-4 * (1 + math.cos(math.pi * 3 / 600)) / 2, rel=1e-6)
    (saved,) = tmp_path.rglob("config.yaml")
    config = yaml.safe_load(saved.read_text())
    assert config["model"]["kl_coef"] == 0.0
    assert config["model"]["optimizer"]["init_args"]["lr"] == 2e-4


@pytest.mark.parametrize(
    ("setting", "stored", "given"),
    [
        ("--model.freeze_vision_tower=true", "False", "True"),
        ("--model.dtype=bfloat16", "'float32'", "'bfloat16'"),
        (
            "--model.model_name_or_path=builtin:other",
            "'builtin:tiny-qwen2.5-vl'",
            "'builtin:other'",
        ),
        ("--model.lora.r=8", "None", "{"),
    ],
    ids=["freeze_vision_tower", "dtype", "model_name_or_path", "lora"],
)
def test_a_setting_that_decides_the_weights_is_refused_naming_both_values(
    tmp_path, uninterrupted, capsys, setting, stored, given
):
    """Promise: resuming with another model, dtype, frozen part or LoRA shape stops at parse time
    (before any model loads) with the key, the checkpoint's value and this run's value."""
    key = setting.removeprefix("--").split("=")[0].removesuffix(".r")
    message = _refusal(
        capsys, *fit_args(tmp_path, f"--ckpt_path={_checkpoint(uninterrupted)}", setting)
    )
    assert f"{key}: the checkpoint's run had {stored}, this run has {given}" in message
    assert not list(tmp_path.rglob("*.ckpt"))


def test_a_missing_checkpoint_file_is_refused_by_name(tmp_path, capsys):
    """Promise: a --ckpt_path that does not exist is named before any model loads."""
    missing = tmp_path / "nope.ckpt"
    message = _refusal(capsys, *fit_args(tmp_path, f"--ckpt_path={missing}"))
    assert f"--ckpt_path {missing}: no such file" in message


def test_a_truncated_checkpoint_is_refused_by_name(tmp_path, uninterrupted, capsys):
    """Promise: a checkpoint cut short (a copy that stopped half way) is refused with its name and
    what to do, not torch's bare zip error."""
    whole = _checkpoint(uninterrupted).read_bytes()
    truncated = tmp_path / "cut.ckpt"
    truncated.write_bytes(whole[: len(whole) // 2])
    message = _refusal(capsys, *fit_args(tmp_path, f"--ckpt_path={truncated}"))
    assert f"--ckpt_path {truncated}: the file does not load as a checkpoint" in message
    assert "resume from another checkpoint" in message


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ({"weight": torch.zeros(2)}, "not a Lightning checkpoint"),
        ({"state_dict": {}, "hyper_parameters": {"lr": 0.1}}, "not one of cppo fit"),
        (b"\x80\x04K\x65.", "does not load as a checkpoint"),  # a pickle of the integer 101
    ],
    ids=["state-dict-only", "other-lightning-module", "plain-pickle"],
)
def test_a_foreign_checkpoint_is_refused_saying_what_it_is(tmp_path, capsys, content, expected):
    """Promise: a file torch can read that is not a checkpoint of cppo fit (a bare state dict,
    another module's checkpoint, a plain pickle) is refused by name, not with a KeyError."""
    foreign = tmp_path / "foreign.ckpt"
    if isinstance(content, bytes):
        foreign.write_bytes(content)
    else:
        torch.save(content, foreign)
    message = _refusal(capsys, *fit_args(tmp_path, f"--ckpt_path={foreign}"))
    assert f"--ckpt_path {foreign}: " in message
    assert expected in message


def test_a_weights_only_checkpoint_is_refused_for_fit(tmp_path, uninterrupted, capsys):
    """Promise: `cppo fit` from a checkpoint without optimizer state and loop counters (saved
    with save_weights_only) is refused, saying it cannot be resumed."""
    checkpoint = torch.load(_checkpoint(uninterrupted), map_location="cpu", weights_only=True)
    for key in ("optimizer_states", "loops", "lr_schedulers"):
        checkpoint.pop(key, None)
    weights = tmp_path / "weights.ckpt"
    torch.save(checkpoint, weights)
    message = _refusal(capsys, *fit_args(tmp_path, f"--ckpt_path={weights}"))
    assert "a weights-only checkpoint" in message


@pytest.mark.parametrize("marker", ["meta.pt", ".metadata", "checkpoint/"])
def test_a_sharded_checkpoint_folder_is_left_to_lightning(tmp_path, marker):
    """A --ckpt_path folder that is one sharded checkpoint (FSDP's and ModelParallel's meta.pt,
    torch.distributed.checkpoint's .metadata, DeepSpeed's checkpoint/) has no single file to read:
    the settings check passes it through instead of refusing it."""
    from types import SimpleNamespace

    from cppo_lightning.cli import CPPOCLI

    if marker.endswith("/"):
        (tmp_path / marker).mkdir()
    else:
        (tmp_path / marker).write_bytes(b"")
    cli = SimpleNamespace(config={"subcommand": "fit", "fit": {"ckpt_path": str(tmp_path)}})
    CPPOCLI._parse_ckpt_path(cli)  # type: ignore[arg-type]


def test_a_folder_of_checkpoints_is_refused_listing_them(tmp_path, uninterrupted, capsys):
    """Promise: a --ckpt_path folder that is not a sharded checkpoint (e.g. a run's checkpoints/)
    is refused at parse time, before any model loads, listing the .ckpt files in it. It passed
    the checks and failed with IsADirectoryError after loading the data and the model."""
    folder = _checkpoint(uninterrupted).parent
    message = _refusal(capsys, *fit_args(tmp_path, f"--ckpt_path={folder}"))
    assert f"--ckpt_path {folder}: a folder, not a checkpoint file" in message
    assert "step=1.ckpt" in message and "step=5.ckpt" in message
    assert not list(tmp_path.rglob("*.ckpt"))


def _copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True)
    shutil.copyfile(source, target)


def test_ckpt_path_last_resumes_from_the_newest_version_folders_last_ckpt(
    tmp_path, uninterrupted, caplog
):
    """Promise: `--ckpt_path last` resumes from last.ckpt of the newest version folder that has
    one under trainer.default_root_dir, and names it. Lightning looked only in the new run's own
    (empty) version folder, warned, and trained from step 0 (exit 0)."""
    logs = tmp_path / "lightning_logs"
    _copy(_checkpoint(uninterrupted, 1), logs / "version_0" / "checkpoints" / "last.ckpt")
    newest = logs / "version_1" / "checkpoints" / "last.ckpt"
    _copy(_checkpoint(uninterrupted, 2), newest)
    (logs / "version_2" / "checkpoints").mkdir(parents=True)  # a run that saved nothing
    with caplog.at_level("INFO"):
        cli = main(fit_args(tmp_path, "--ckpt_path=last", steps=3))
    assert f"--ckpt_path last: {newest}" in caplog.text
    assert cli.trainer.ckpt_path == str(newest)
    assert cli.trainer.global_step == 3


def test_ckpt_path_last_without_a_last_ckpt_is_refused(tmp_path, capsys):
    """Promise: `--ckpt_path last` when no version folder under trainer.default_root_dir holds a
    last.ckpt is refused at parse time, naming where it looked, instead of training from step 0."""
    (tmp_path / "lightning_logs" / "version_0" / "checkpoints").mkdir(parents=True)
    message = _refusal(capsys, *fit_args(tmp_path, "--ckpt_path=last"))
    assert "--ckpt_path last: no last.ckpt in" in message
    assert str(tmp_path / "lightning_logs") in message
