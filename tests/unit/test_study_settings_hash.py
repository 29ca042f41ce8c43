"""A study's settings compare YAML files by their data (src/cppo_lightning/study/settings.py): a
comment or layout edited in a config does not split a study; a value changed does; a study saved
before data hashes is compared by bytes."""

from __future__ import annotations

from pathlib import Path

from cppo_lightning.study.settings import (
    Method,
    compare_settings,
    data_hash,
    study_settings,
)

BASE = "# the base\ntrainer:\n  max_steps: 600   # optimizer steps\nmodel:\n  lr: 1.0e-5\n"
COMMENTED = "model: {lr: 1.0e-5}   # moved up, comment edited\ntrainer:\n  max_steps: 600\n"
CHANGED = "# the base\ntrainer:\n  max_steps: 601   # optimizer steps\nmodel:\n  lr: 1.0e-5\n"


def _settings(tmp_path: Path, base: str, overlay: str = "model:\n  beta: 0.0\n") -> dict:
    folder = tmp_path / str(len(list(tmp_path.iterdir())))
    folder.mkdir()
    (folder / "base.yaml").write_text(base)
    (folder / "grpo.yaml").write_text(overlay)
    (folder / "eval.yaml").write_text("name: e\nsplit: validation\n")
    return study_settings(
        [folder / "base.yaml"],
        [Method("grpo", "grpo", folder / "grpo.yaml")],
        [],
        4,
        1.0,
        str(folder / "eval.yaml"),
        16,
    )


def test_data_hash_ignores_comments_layout_and_key_order(tmp_path):
    files = {}
    for name, text in {"a": BASE, "b": COMMENTED, "c": CHANGED}.items():
        files[name] = tmp_path / f"{name}.yaml"
        files[name].write_text(text)
    assert data_hash(files["a"]) == data_hash(files["b"])
    assert data_hash(files["a"]) != data_hash(files["c"])
    (tmp_path / "x.json").write_text("{}")
    assert data_hash(tmp_path / "x.json") is None
    (tmp_path / "bad.yaml").write_text("a: [unclosed\n")
    assert data_hash(tmp_path / "bad.yaml") is None


def test_a_comment_edit_is_the_same_study_and_a_value_change_is_not(tmp_path):
    before = _settings(tmp_path, BASE)
    assert compare_settings(before, _settings(tmp_path, COMMENTED)) == []
    changes = compare_settings(before, _settings(tmp_path, CHANGED))
    assert len(changes) == 1 and changes[0].startswith("configs: "), changes


def test_an_overlay_is_compared_by_its_data_too(tmp_path):
    before = _settings(tmp_path, BASE)
    same = _settings(tmp_path, BASE, overlay="# GRPO: no reference KL\nmodel: {beta: 0.0}\n")
    assert compare_settings(before, same) == []
    other = _settings(tmp_path, BASE, overlay="model:\n  beta: 0.04\n")
    assert compare_settings(before, other) == [
        f"method grpo: overlay {before['overlays']['grpo']['path']} -> "
        f"{other['overlays']['grpo']['path']} (its content differs)"
    ]


def test_a_study_saved_before_data_hashes_is_compared_by_bytes(tmp_path):
    old = _settings(tmp_path, BASE)
    for entry in [*old["configs"], old["eval_set"], old["overlays"]["grpo"]]:
        del entry["data_sha256"]
    assert compare_settings(old, _settings(tmp_path, BASE)) == []
    changes = compare_settings(old, _settings(tmp_path, COMMENTED))
    assert len(changes) == 1 and changes[0].startswith("configs: "), changes
