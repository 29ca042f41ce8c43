"""Every run gets a folder of its own, in a root it can write, and a refused setting reads as one
line: two runs with one `trainer.default_root_dir` never share a `version_N`; a root that cannot
be written is named before anything loads; errors found before training exit 2 without a
traceback."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from cppo_lightning.cli import main
from tests.helpers.runs import REPO, fit_args


class _StaleListing:
    """``os.listdir`` / ``os.scandir`` of ``folder`` without ``hidden``: what a run sees when it
    lists the folder just before another run creates ``hidden`` there."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, folder: Path, hidden: str) -> None:
        self.folder, self.hidden = os.path.abspath(folder), hidden
        real_listdir, real_scandir = os.listdir, os.scandir

        def listdir(path: object = ".") -> list:
            names = real_listdir(path)  # type: ignore[arg-type]
            return [n for n in names if not self._hides(path, n)]

        class Scan:
            def __init__(self, path: object = ".") -> None:
                self.path, self.scan = path, real_scandir(path)  # type: ignore[arg-type]

            def __enter__(self) -> Scan:
                return self

            def __exit__(self, *exc: object) -> None:
                self.scan.close()

            def __iter__(self) -> Scan:
                return self

            def __next__(self) -> os.DirEntry:
                entry = next(self.scan)
                while outer._hides(self.path, entry.name):
                    entry = next(self.scan)
                return entry

            def close(self) -> None:
                self.scan.close()

        outer = self
        monkeypatch.setattr(os, "listdir", listdir)
        monkeypatch.setattr(os, "scandir", Scan)

    def _hides(self, path: object, name: str) -> bool:
        folder = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else None
        return name == self.hidden and folder is not None and os.path.abspath(folder) == self.folder


def test_two_runs_with_one_root_dir_write_into_folders_of_their_own(tmp_path, monkeypatch):
    """Promise: a second run that lists `lightning_logs/` before the first run's `version_0`
    appears there (two `cppo fit` started together) still gets a folder of its own, and each
    folder holds that run's config.yaml, hparams.yaml, checkpoints and hf_policy/. Lightning's
    logger took the number from the listing: both runs wrote into version_0 (one's config.yaml,
    the other's hparams.yaml, last.ckpt and last-v1.ckpt, one hf_policy/ over the other)."""
    main(fit_args(tmp_path, "--seed_everything=1", steps=1))
    logs = tmp_path / "lightning_logs"
    assert [p.name for p in logs.iterdir()] == ["version_0"]
    with monkeypatch.context() as patch:
        _StaleListing(patch, logs, "version_0")
        main(fit_args(tmp_path, "--seed_everything=2", steps=1))
    folders = sorted(p.name for p in logs.iterdir())
    assert folders == ["version_0", "version_1"]
    for seed, name in ((1, "version_0"), (2, "version_1")):
        folder = logs / name
        assert yaml.safe_load((folder / "config.yaml").read_text())["seed_everything"] == seed
        assert (folder / "hparams.yaml").is_file()
        assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["last.ckpt"]
        assert (folder / "hf_policy" / "model.safetensors").is_file()
        assert len(list(folder.glob("events.out.tfevents.*"))) == 1


def test_claims_made_at_the_same_moment_get_different_versions(tmp_path):
    """Promise: runs that claim a version folder in one root at the same moment each get their
    own number (`os.mkdir` fails for all but one of them; the others take the next)."""
    from cppo_lightning.run_folder import claim_version

    start = threading.Barrier(8)
    claimed: list[int] = []

    def claim() -> None:
        start.wait()
        claimed.append(claim_version(tmp_path))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(claimed) == list(range(8))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"version_{n}" for n in range(8))


def test_a_root_dir_under_a_file_is_refused_naming_the_setting(tmp_path, capsys):
    """Promise: a `trainer.default_root_dir` that cannot be created (here: under a file) is
    refused before any model loads, naming the setting, instead of the logger's traceback."""
    (tmp_path / "a-file").write_text("")
    root = tmp_path / "a-file" / "runs"
    with pytest.raises(SystemExit) as raised:
        main(fit_args(root, steps=1))
    assert raised.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"trainer.default_root_dir={root} cannot be written" in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_root_dir_is_refused_naming_the_setting(tmp_path, capsys):
    """Promise: a read-only `trainer.default_root_dir` is refused at start, naming the setting
    (Lightning's logger failed in a 30-frame traceback)."""
    root = tmp_path / "runs"
    root.mkdir()
    root.chmod(0o555)
    try:
        with pytest.raises(SystemExit) as raised:
            main(fit_args(root, steps=1))
    finally:
        root.chmod(0o755)
    assert raised.value.code == 2
    assert "trainer.default_root_dir" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model.kl_coef=-1"], "error: model.kl_coef must be >= 0"),
        (
            ["--data.dataset.init_args.num_train=1"],  # fewer rows than data.batch_size 2
            "data.batch_size",
        ),
    ],
    ids=["negative-kl_coef", "train-split-below-one-batch"],
)
def test_a_setting_refused_before_training_exits_2_with_its_message_alone(tmp_path, extra, message):
    """Promise: `cppo fit` with a setting the module or the data refuse (a negative
    model.kl_coef; a train split smaller than one batch, found at setup) prints the message
    alone, not after a traceback, and exits 2 like the parser's own errors (it was a traceback
    and exit 1)."""
    args = fit_args(tmp_path, "--trainer.logger=false", *extra, steps=1)
    result = subprocess.run(
        [sys.executable, "-m", "cppo_lightning.cli", *args],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last


def _raise_in(name: str, error: BaseException) -> BaseException:
    """``error`` as raised from a function called ``name``."""
    namespace: dict = {}
    exec(f"def {name}(error):\n    raise error\n", namespace)
    try:
        namespace[name](error)
    except BaseException as raised:
        return raised
    raise AssertionError


def test_errors_that_are_bugs_keep_their_traceback():
    """Promise: only the project's refusals lose their traceback: a ValueError raised by other
    code (here: Python's own `int('x')`) or raised once training has started
    (Lightning's `_run_stage`) is shown in full."""
    from cppo_lightning.cli import is_configuration_error
    from cppo_lightning.errors import ConfigError

    try:
        int("x")
    except ValueError as error:
        assert not is_configuration_error(error)
    assert is_configuration_error(_raise_in("setup", ConfigError("model.x must be > 0")))
    assert not is_configuration_error(_raise_in("_run_stage", ConfigError("during training")))
