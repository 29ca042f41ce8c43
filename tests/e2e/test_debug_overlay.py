"""configs/debug.yaml, the smoke test: stacked last on any config, ``cppo fit`` runs 4 optimizer
steps through every stage of a run (validation before the first update, two mini-batches a
rollout batch, the Evaluation callback, the final validation, checkpoint, export)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cppo_lightning.callbacks import Evaluation
from cppo_lightning.cli import main
from tests.helpers.runs import BASE, REPO

DEBUG = str(REPO / "configs" / "debug.yaml")


def _debug_run(root: Path, *configs: str):  # type: ignore[no-untyped-def]
    stack = [arg for config in (BASE, *configs, DEBUG) for arg in ("--config", config)]
    return main(["fit", *stack, f"--trainer.default_root_dir={root}"])


@pytest.mark.parametrize("overlay", [None, "experiments/grpo.yaml"], ids=["base", "grpo"])
def test_the_debug_overlay_runs_a_config_end_to_end(tmp_path: Path, overlay: str | None):
    configs = [str(REPO / "configs" / overlay)] if overlay else []
    cli = _debug_run(tmp_path, *configs)
    trainer = cli.trainer
    assert trainer.global_step == 4
    assert cli.model.optimizer_steps_per_batch == 2  # two mini-batches, as the full run
    run_dir = Path(trainer.log_dir)
    assert run_dir.parent.parent == tmp_path
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "hf_policy" / "config.json").is_file()
    # The Evaluation callback ran on one of its batches per condition, not the whole set.
    (evaluation,) = [cb for cb in trainer.callbacks if isinstance(cb, Evaluation)]
    assert {r["images"] for r in evaluation.last_results} == {"original", "blank", "shuffled"}
    assert {r["n"] for r in evaluation.last_results} == {evaluation.batch_size}


def test_the_debug_overlay_stacks_on_every_shipped_config():
    """Every shipped overlay of the embedded model (experiments/, perturbations/, testbeds/,
    own-data.yaml) with debug.yaml on top parses and instantiates: the settings checks of
    construction pass with the debug counts. (configs/models/ and configs/paper/ name hub
    checkpoints, which are not here.)"""
    configs = REPO / "configs"
    overlays = sorted(
        path
        for path in configs.rglob("*.yaml")
        if path.parent.name not in ("eval", "models", "paper")
        and path.name not in ("base.yaml", "debug.yaml")
    )
    assert configs / "experiments" / "grpo.yaml" in overlays
    for overlay in overlays:
        stack = [arg for c in (BASE, str(overlay), DEBUG) for arg in ("--config", c)]
        cli = main([*stack, "--trainer.logger=false"], run=False)
        assert cli.trainer.max_steps == 4, overlay.name
        assert cli.trainer.limit_val_batches == 1, overlay.name
        assert cli.trainer.default_root_dir.endswith("runs/debug"), overlay.name
