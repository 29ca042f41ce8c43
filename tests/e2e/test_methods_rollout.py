"""End-to-end: the rollout-seam overlays (configs/experiments/dapo.yaml, noisyrollout.yaml) through
``cppo fit`` on the embedded model for two optimizer steps, and DAPO's dynamic sampling resumed
bit for bit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cppo_lightning.cli import main
from tests.helpers.runs import EVERY_STEP, shrunk
from tests.helpers.steps import read_steps

REPO = Path(__file__).resolve().parents[2]
BASE = str(REPO / "configs" / "base.yaml")

# DAPO's filter on a reward that leaves some groups equal: the synthetic task's counting
# questions score by length, the others 0 for every response (their groups are dropped). Three
# rounds at most, so the cap is reached in seconds. The overlay's overlong term is kept, sized
# to these runs' 16-token responses (L_max 16, L_cache 4).
DAPO = [
    "--model.reward.init_args.functions={counting: "
    "tests.helpers.methods_rollout.counting_only_reward, overlong: {class_path: "
    "cppo_lightning.rewards_dapo.OverlongPenalty, init_args: {max_length: 16, cache_length: 4}}}",
    "--model.reward.init_args.weights={counting: 1.0, overlong: 1.0}",
    "--model.val_accuracy_term=counting",
    "--rollout.filter.init_args.metric=reward",
    "--rollout.filter.init_args.max_rounds=3",
]


def _args(root: Path, overlay: str, *extra: str, steps: int = 2) -> list[str]:
    """``cppo fit`` on base.yaml + the overlay, shrunk as tests/helpers/runs.py's runs are: 6
    training rows in batches of 2 (3 rollout batches per epoch), 16-token responses."""
    return [
        "fit",
        "--config",
        BASE,
        "--config",
        str(REPO / "configs" / "experiments" / f"{overlay}.yaml"),
        *shrunk(root, steps),
        "--model.val_samples=1",
        "--trainer.callbacks.num_rows=4",  # base.yaml's Evaluation callback, on 4 prompts
        *extra,
    ]


def _scalars(log_dir: str) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(log_dir)
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def test_dapo_overlay_samples_until_the_batch_is_informative(tmp_path):
    cli = main(_args(tmp_path, "dapo", *DAPO))
    module = cli.model
    assert module.global_step == 2
    scalars = _scalars(cli.trainer.log_dir)
    rounds = scalars["rollout/sampling_rounds"]
    assert sorted(rounds) == [1, 2]  # once per step, on the optimizer-step axis
    for step, count in rounds.items():
        dropped = scalars["rollout/dropped_groups"][step]
        cap = scalars["rollout/sampling_cap_hit"][step]
        filled = scalars["rollout/filled_groups"][step]
        assert count in (1, 2, 3) and 0 <= dropped <= 2 * count, (step, count, dropped)
        # One process: a second round runs exactly when the first dropped a group.
        assert (count > 1) == (dropped > 0)
        assert cap in (0.0, 1.0) and (cap == 1.0) <= (count == 3)
        assert filled <= 2 and (filled > 0) <= (cap == 1.0)
    assert any(v > 1 for v in rounds.values()), "no step needed a second round"
    for tag in ("rollout/overlong", "rollout/truncated_fraction", "train/clip_frac"):
        assert tag in scalars, tag
    assert "train/kl" not in scalars  # kl_coef 0: no reference KL
    # The step trained on data.batch_size groups, informative but for the filled ones.
    record = module.last_update
    assert record is not None and record.rollout.prompts.num_prompts == 2
    groups = record.rollout.rewards.view(2, -1)
    equal = int((groups.max(1).values == groups.min(1).values).sum())
    assert equal <= scalars["rollout/filled_groups"][2]
    assert module.reference is None


def test_noisyrollout_overlay_anneals_the_noise_over_the_run(tmp_path):
    # Linear decay over the run's 2 rollout batches: t = int(500 (1 - step / 2)) -> 250, 0.
    cli = main(_args(tmp_path, "noisyrollout", "--rollout.view.init_args.decay=linear"))
    assert cli.model.global_step == 2
    scalars = _scalars(cli.trainer.log_dir)
    assert scalars["rollout/noise_timestep"] == {1: 250.0, 2: 0.0}
    for tag in ("rollout/reward_mean_clean", "rollout/reward_mean_noisy"):
        assert sorted(scalars[tag]) == [1, 2] and all(
            0.0 <= v <= 1.0 for v in scalars[tag].values()
        ), tag
    record = cli.model.last_update
    assert record is not None and record.rollout.generated_from is not None
    # G = 8: 4 clean then 4 noisy responses per prompt, one group.
    assert record.rollout.generated_from.tolist() == ([0] * 4 + [1] * 4) * 2
    assert record.rollout.advantages is not None
    assert torch.allclose(record.rollout.advantages.view(2, 8).sum(1), torch.zeros(2), atol=1e-5)


def _recorded(root: Path, *extra: str, steps: int) -> dict[int, dict]:
    record = ["--trainer.callbacks+=tests.helpers.steps.RecordSteps"]
    main(
        _args(
            root,
            "dapo",
            *DAPO,
            *record,
            f"--trainer.callbacks.directory={root}",
            *EVERY_STEP,
            *extra,
            steps=steps,
        )
    )
    return read_steps(root)


def test_dynamic_sampling_resumes_bit_for_bit(tmp_path):
    """Promise: a DAPO run resumed from its step-1 checkpoint takes the same steps 2 and 3
    (extra rounds, their prompts, the cap) as the run that went on, bit for bit on CPU."""
    full = _recorded(tmp_path / "full", steps=3)
    assert sorted(full) == [1, 2, 3]
    assert any(float(r["metrics"]["rollout/sampling_rounds"]) > 1 for r in full.values())
    (checkpoint,) = (tmp_path / "full").rglob("step=1.ckpt")
    resumed = _recorded(tmp_path / "resumed", f"--ckpt_path={checkpoint}", steps=3)
    assert sorted(resumed) == [2, 3]
    for later in resumed:
        assert resumed[later]["metrics"] == full[later]["metrics"], f"step {later}"
        assert resumed[later]["weights"] == full[later]["weights"], f"step {later}"


@pytest.mark.slow
def test_dynamic_sampling_under_ddp_gives_every_rank_the_same_groups(tmp_path):
    """Two CPU processes (gloo), different prompts per rank: every rank runs as many rounds as
    the one that needs the most (or a rank would wait on a collective the other never issues),
    trains on data.batch_size groups, and the ranks end each step with the same weights."""
    command = [
        sys.executable,
        "-m",
        "cppo_lightning.cli",
        *_args(
            tmp_path,
            "dapo",
            *DAPO,
            "--trainer.accelerator=cpu",
            "--trainer.devices=2",
            "--trainer.strategy=ddp",
            "--data.dataset.init_args.num_train=12",
            "--trainer.callbacks+=tests.helpers.steps.RecordSteps",
            f"--trainer.callbacks.directory={tmp_path}",
            "--trainer.callbacks+=tests.helpers.methods_rollout.RecordGroups",
            f"--trainer.callbacks.directory={tmp_path}",
        ),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = {rank: read_steps(tmp_path, rank) for rank in (0, 1)}
    assert sorted(steps[0]) == sorted(steps[1]) == [1, 2]
    for step in (1, 2):
        assert steps[0][step]["weights"] == steps[1][step]["weights"], step
    for rank in (0, 1):
        groups = (tmp_path / f"groups_rank{rank}.txt").read_text().split()
        assert groups == ["2", "2"], (rank, groups)
