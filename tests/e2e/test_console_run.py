"""A newcomer's run, as the ``cppo`` console script gives it, from a folder of their own: a reward
in their own package imports without PYTHONPATH, the console says where the run's files go, what
each held-out measurement gave and where the results are at the end, and shows none of the
warnings a user cannot act on (while their own warnings still show)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.runs import BASE, REPO, shrunk

CPPO = str(Path(sys.executable).with_name("cppo"))

REWARDS = """
import warnings
from pathlib import Path

warnings.warn("mypkg: a warning of the user's own")


def contains_answer(completions, answer, **_):
    Path("reward-was-called").touch()
    return [float(str(a) in text) for text, a in zip(completions, answer)]
"""


def _user_folder(root: Path) -> Path:
    folder = root / "project"
    (folder / "mypkg").mkdir(parents=True)
    (folder / "mypkg" / "__init__.py").write_text("")
    (folder / "mypkg" / "rewards.py").write_text(REWARDS)
    return folder


def _cppo(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [CPPO, *args], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """A 2-step shrunk ``cppo fit`` of base.yaml from the user's folder with their reward."""
    folder = _user_folder(tmp_path_factory.mktemp("newcomer"))
    done = _cppo(
        folder,
        "fit",
        "--config",
        BASE,
        *shrunk(folder / "runs", steps=2),
        "--model.val_samples=2",
        "--model.reward.init_args.functions="
        "{accuracy: mypkg.rewards.contains_answer, format: cppo_lightning.rewards.format_reward}",
        # base.yaml's Evaluation callback on 4 prompts; its set path is relative to the repo.
        f"--trainer.callbacks.sets=[{REPO / 'configs' / 'eval' / 'synthetic.yaml'}]",
        "--trainer.callbacks.num_rows=4",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return folder, done


def test_a_reward_in_the_working_directory_imports_without_pythonpath(run):
    folder, _ = run
    assert (folder / "reward-was-called").is_file()


def test_the_console_says_where_the_run_went(run):
    folder, done = run
    lines = done.stderr.splitlines()
    run_dir = folder / "runs" / "lightning_logs" / "version_0"
    # The run folder first, before the data and model load.
    first = next(i for i, line in enumerate(lines) if line.startswith("run folder: "))
    assert lines[first] == (f"run folder: {run_dir} (watch it: tensorboard --logdir {run_dir})")
    assert first < next(i for i, line in enumerate(lines) if "data train: kept" in line)
    # Each validation's figures (step 0 and the final one at step 2), and the Evaluation's.
    held_out = [line for line in lines if line.startswith("held-out at step ")]
    assert [line.split(":")[0] for line in held_out if "val/accuracy" in line] == [
        "held-out at step 0",
        "held-out at step 2",
    ]
    assert any(
        line.startswith("held-out at step 0: eval/synthetic accuracy: original ")
        and "blank " in line
        and "(gap " in line
        for line in held_out
    )
    # The end: after the export's output, the paths, each on disk.
    end = lines.index("done at step 2:")
    assert end > max(i for i, line in enumerate(lines) if "Writing model shards" in line)
    summary = dict(line.strip().split(": ", 1) for line in lines[end + 1 : end + 4])
    assert Path(summary["checkpoint"]) == run_dir / "checkpoints" / "last.ckpt"
    assert Path(summary["exported policy"]) == run_dir / "hf_policy"
    assert summary["TensorBoard"] == f"tensorboard --logdir {run_dir}"
    assert Path(summary["checkpoint"]).is_file()
    assert (Path(summary["exported policy"]) / "config.json").is_file()


def test_no_warning_a_user_cannot_act_on(run):
    _, done = run
    shown = done.stderr
    assert "module(s) in eval mode" not in shown  # the frozen reference, by design
    assert "LeafSpec" not in shown  # Lightning's own call into torch's pytree
    assert "litlogger" not in shown  # Lightning's advertisement
    assert "mypkg: a warning of the user's own" in shown  # other warnings still show


def test_a_reward_that_does_not_import_says_why_first(tmp_path):
    folder = _user_folder(tmp_path)
    done = _cppo(
        folder,
        "fit",
        "--config",
        BASE,
        "--model.reward.init_args.functions="
        "{accuracy: otherpkg.rewards.f, format: cppo_lightning.rewards.format_reward}",
        "--print_config",
    )
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert lines[0] == (
        "cppo: cannot import 'otherpkg.rewards.f': No module named 'otherpkg' (code in the "
        "working directory is importable; else add its folder to PYTHONPATH)"
    )
    assert lines[1].startswith("usage: cppo")
