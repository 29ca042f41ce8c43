"""Two DDP processes on CPU (gloo) run the CPPO default for two steps: every rank must issue the
same collectives (logged keys, detection counts), whatever its own data, and the ranks must end
with the same weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "extra",
    [
        ["--model.micro_batch_size=3"],  # several backward passes per optimizer step
        # Token-budget micro-batches (a collective fixes their count) and the global batch std.
        ["--model.micro_batch_tokens=400", "--model.advantage_scale=batch"],
    ],
    ids=["fixed-micro-batches", "token-budget-batch-std"],
)
def test_cppo_trains_under_ddp_on_two_cpu_processes(tmp_path, extra):
    command = [
        sys.executable,
        "-m",
        "cppo_lightning.cli",
        "fit",
        "--config",
        str(REPO / "configs" / "base.yaml"),
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
        "--trainer.max_steps=2",
        "--trainer.val_check_interval=2",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
        "--data.batch_size=2",
        "--model.mini_batch_size=null",  # one optimizer step per rollout batch of 2
        "--data.dataset.init_args.num_train=16",
        "--data.dataset.init_args.num_val=4",
        "--rollout.max_new_tokens=16",
        "--model.val_samples=1",
        *extra,
        "--trainer.callbacks.num_rows=4",  # base.yaml's Evaluation callback, on 4 prompts
        "--trainer.callbacks+=tests.helpers.checksum.WriteParameterChecksum",
        f"--trainer.callbacks.directory={tmp_path / 'checksums'}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # A rank waiting on a collective the other never issues would hang: bound it.
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=480)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "`Trainer.fit` stopped: `max_steps=2` reached." in result.stderr + result.stdout
    assert list(tmp_path.rglob("hf_policy/config.json")), "rank 0 did not export the policy"
    # Rank 0 claimed one version folder; the rank its launcher started wrote into the same one.
    assert [p.name for p in (tmp_path / "lightning_logs").iterdir()] == ["version_0"]
    # Gradients are averaged over ranks, so both hold the same weights after the updates.
    sums = [(tmp_path / "checksums" / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert sums[0] == sums[1], sums
