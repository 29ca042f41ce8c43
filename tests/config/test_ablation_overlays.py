"""CPPO's ablation overlays change one key of base.yaml's ``perception_tokens`` and keep the rest.

LightningCLI (jsonargparse) merges a second ``--config`` into the first: for a subclass value with
the same ``class_path`` its ``init_args`` are merged key by key, so an overlay that names one key
keeps base.yaml's others (its ``top_fraction: 0.1`` and ``score: raw``). Checked on what
``--print_config`` prints (the configuration that runs) and on the instantiated callback.
"""

from __future__ import annotations

import io
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import yaml

from cppo_lightning.callbacks import PerceptionTokens
from cppo_lightning.cli import main

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "configs" / "base.yaml"

#: overlay -> the one ``perception_tokens.init_args`` key it changes, and its value.
ABLATIONS = {
    "cppo-entropy-selection": ("ranking", "entropy"),
    "cppo-random-selection": ("ranking", "random"),
    "cppo-no-gating": ("gate_advantages", False),
}


def _printed(*configs: Path) -> dict:
    args = [arg for config in configs for arg in ("--config", str(config))]
    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit) as done:
        main(["fit", *args, "--print_config"])
    assert done.value.code in (None, 0)
    return yaml.safe_load(out.getvalue())


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_an_ablation_overlay_changes_only_its_key(name):
    overlay = REPO / "configs" / "experiments" / f"{name}.yaml"
    base, merged = _printed(BASE), _printed(BASE, overlay)
    key, value = ABLATIONS[name]
    tokens = merged["perception_tokens"]
    assert tokens["class_path"] == "cppo_lightning.callbacks.PerceptionTokens"
    assert tokens["init_args"]["top_fraction"] == 0.1 and tokens["init_args"]["score"] == "raw"
    assert tokens["init_args"][key] == value
    assert base["perception_tokens"]["init_args"][key] != value
    assert {**base["perception_tokens"]["init_args"], key: value} == tokens["init_args"]
    # Nothing else changes but the run folder.
    assert merged["trainer"]["default_root_dir"] == f"runs/{name}"
    for section in set(base) | set(merged):
        if section not in ("perception_tokens", "trainer"):
            assert merged.get(section) == base.get(section), section
    rest = {k: v for k, v in merged["trainer"].items() if k != "default_root_dir"}
    assert rest == {k: v for k, v in base["trainer"].items() if k != "default_root_dir"}
    # The header says how to run it.
    command = f"cppo fit --config configs/base.yaml --config configs/experiments/{name}.yaml"
    assert command in overlay.read_text()


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_an_ablation_overlay_builds_its_selector(name):
    overlay = REPO / "configs" / "experiments" / f"{name}.yaml"
    cli = main(
        ["--config", str(BASE), "--config", str(overlay), "--trainer.logger=false"], run=False
    )
    (callback,) = (cb for cb in cli.trainer.callbacks if isinstance(cb, PerceptionTokens))
    key, value = ABLATIONS[name]
    assert getattr(callback.selector, key) == value
    assert (callback.selector.top_fraction, callback.selector.score) == (0.1, "raw")


def test_a_bad_ranking_is_refused_at_parse_time(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(BASE), "--perception_tokens.init_args.ranking=entropy_shift"])
    error = capsys.readouterr().err
    assert "ranking" in error and "'entropy-shift', 'entropy', 'random'" in error
