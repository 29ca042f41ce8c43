"""End-to-end: configs/testbeds/shortcut.yaml between base.yaml and the GRPO overlay through
``cppo fit``, shrunk to seconds: it trains on the shortcut source and logs the greedy accuracy of
both held-out sets under stable keys."""

from __future__ import annotations

from pathlib import Path

from cppo_lightning.cli import main
from cppo_lightning.data import ShortcutShapes
from tests.helpers.runs import shrunk

REPO = Path(__file__).resolve().parents[2]


def _scalars(log_dir: str) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(log_dir)
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def test_shortcut_overlay_trains_and_logs_both_sets(tmp_path: Path) -> None:
    """With GRPO's overlay on top, the testbed's calibration run."""
    configs = [
        "configs/base.yaml",
        "configs/testbeds/shortcut.yaml",
        "configs/experiments/grpo.yaml",
    ]
    args = ["fit", *(a for c in configs for a in ("--config", str(REPO / c)))]
    cli = main(
        [
            *args,
            *shrunk(tmp_path, 2),
            "--model.val_samples=1",
            "--trainer.callbacks.num_rows=4",  # the overlay's Evaluation, on 4 prompts a set
            "--trainer.callbacks.every_n_steps=2",
        ]
    )
    assert isinstance(cli.datamodule.source, ShortcutShapes)
    assert cli.model.global_step == 2
    scalars = _scalars(cli.trainer.log_dir)
    for name in ("shortcut", "shortcut-counter"):
        for images in ("original", "blank"):
            assert sorted(scalars[f"eval/{name}/{images}/accuracy"]) == [0, 2], (name, images)
        assert f"eval/{name}/blank/gap" in scalars
    assert not any(tag.startswith("eval/synthetic/") for tag in scalars)
