"""Own data on the default run: configs/own-data.yaml keeps base.yaml's training and callbacks
except what only the synthetic task can measure (its held-out evaluation, the perception-word
precision), and a run on a handful of own rows finishes without them."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cppo_lightning.callbacks import Evaluation, PerceptionMonitor
from cppo_lightning.cli import main
from tests.helpers.runs import BASE, REPO

OWN_DATA = REPO / "configs" / "own-data.yaml"
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def _own_rows(root: Path, rows: int = 6) -> Path:
    """A jsonl file in the layout docs/own-data.md describes: one image path per row (relative to
    the file), the question in `prompt`, the answer in `label`, and a column of the user's own."""
    path = root / "mine" / "train.jsonl"
    (path.parent / "images").mkdir(parents=True)
    with path.open("w") as handle:
        for i in range(rows):
            name = list(COLOURS)[i % len(COLOURS)]
            Image.new("RGB", (112, 112), COLOURS[name]).save(path.parent / "images" / f"{i}.png")
            row = {
                "prompt": "What colour is the picture?",
                "label": name,
                "picture": f"images/{i}.png",
                "source": "mine",
            }
            handle.write(json.dumps(row) + "\n")
    return path


def test_the_overlay_lists_base_callbacks_but_the_synthetic_evaluation():
    base = yaml.safe_load(Path(BASE).read_text())["trainer"]["callbacks"]
    own = yaml.safe_load(OWN_DATA.read_text())["trainer"]["callbacks"]
    kept = [c for c in base if c["class_path"] != "cppo_lightning.callbacks.Evaluation"]
    assert len(kept) == len(base) - 1
    assert own == kept, "configs/own-data.yaml must restate base.yaml's callbacks but Evaluation"


def test_own_rows_train_without_the_synthetic_task_metrics(tmp_path: Path, caplog):
    data = _own_rows(tmp_path)
    with caplog.at_level(logging.INFO):
        cli = main(
            [
                "fit",
                "--config",
                BASE,
                "--config",
                str(OWN_DATA),
                f"--data.dataset.init_args.train.path={data}",
                "--data.dataset.init_args.train.columns={question: prompt, answer: label, "
                "image: picture}",
                "--data.dataset.init_args.validation_size=2",
                f"--trainer.default_root_dir={tmp_path / 'run'}",
                "--trainer.max_steps=2",
                "--trainer.val_check_interval=2",
                "--trainer.enable_progress_bar=false",
                "--data.batch_size=2",
                "--model.mini_batch_size=null",
                "--model.val_samples=1",
                "--rollout.max_new_tokens=16",
            ]
        )
    assert cli.trainer.global_step == 2
    assert not any(isinstance(c, Evaluation) for c in cli.trainer.callbacks)
    assert any(isinstance(c, PerceptionMonitor) for c in cli.trainer.callbacks)
    events = EventAccumulator(cli.trainer.log_dir, size_guidance={"scalars": 0})
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert "val/accuracy" in scalars and "rollout/accuracy" in scalars
    assert not [tag for tag in scalars if tag.startswith("eval/")], scalars
    assert not [tag for tag in scalars if tag.startswith("perception/precision")], scalars
    assert "perception/cpl" in scalars  # CPPO itself runs on the rows
    said = [r.getMessage() for r in caplog.records if "PerceptionMonitor" in r.getMessage()]
    assert len(said) == 1 and "'perception_words'" in said[0], said
    assert (Path(cli.trainer.log_dir) / "hf_policy" / "config.json").is_file()


def test_the_overlay_without_a_path_of_yours_names_the_key_to_set(tmp_path: Path):
    # The overlay's placeholder, data/mine/train.jsonl, is not there.
    with pytest.raises(ValueError, match=r"data\.dataset\.init_args\.train\.path.*mine"):
        main(
            [
                "fit",
                "--config",
                BASE,
                "--config",
                str(OWN_DATA),
                f"--trainer.default_root_dir={tmp_path}",
                "--trainer.max_steps=2",
            ]
        )
