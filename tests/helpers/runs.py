"""Arguments of the short runs the fault-injection tests (``tests/faults/``) start."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BASE = str(REPO / "configs" / "base.yaml")


def shrunk(root: Path, steps: int = 2) -> list[str]:
    """The flags that shrink a run of base.yaml (with or without an overlay) to seconds: 6
    training rows in batches of 2 (3 rollout batches per epoch), 4 held-out rows, 16-token
    responses, one optimizer step per rollout batch."""
    return [
        f"--trainer.default_root_dir={root}",
        f"--trainer.max_steps={steps}",
        "--trainer.val_check_interval=2",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        "--data.batch_size=2",
        "--model.mini_batch_size=null",  # one optimizer step per rollout batch of 2
        "--data.dataset.init_args.num_train=6",
        "--data.dataset.init_args.num_val=4",
        "--rollout.max_new_tokens=16",
    ]


def fit_args(root: Path, *extra: str, steps: int = 2) -> list[str]:
    """``cppo fit`` on the embedded default, shrunk to seconds (:func:`shrunk`)."""
    return [
        "fit",
        "--config",
        BASE,
        *shrunk(root, steps),
        "--model.val_samples=2",
        # A reward with variance in every group, so every step has a gradient to follow.
        "--model.reward.init_args.functions={length: tests.helpers.rewards.length_reward}",
        "--model.reward.init_args.weights={length: 1.0}",
        "--model.val_accuracy_term=length",  # the reward has no accuracy term
        "--trainer.callbacks.num_rows=4",  # base.yaml's Evaluation callback, on 4 prompts
        *extra,
    ]


EVERY_STEP = [
    "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
    "--trainer.callbacks.every_n_train_steps=1",
    "--trainer.callbacks.save_top_k=-1",
    "--trainer.callbacks.filename={step}",
]


def run_recorded(root: Path, *extra: str, steps: int = 5) -> dict[int, dict]:
    """A ``fit_args`` run that records every step (``tests.helpers.steps.RecordSteps``) under
    ``root``; returns the record by step."""
    from cppo_lightning.cli import main
    from tests.helpers.steps import read_steps

    record = ["--trainer.callbacks+=tests.helpers.steps.RecordSteps"]
    main(fit_args(root, *record, f"--trainer.callbacks.directory={root}", *extra, steps=steps))
    return read_steps(root)
