"""What a study is: its methods (overlay files), and the settings every run of it shares.

A method is the name of an overlay in ``configs/experiments/`` (``grpo`` is
``configs/experiments/grpo.yaml``), ``cppo`` for no overlay (the base config is CPPO), or a path to
a YAML file. ``<output>/study-settings.json`` keeps the settings the study's runs were made with;
a later ``cppo study`` on the same output is refused when they differ (:func:`compare_settings`),
since its runs could not be compared with the earlier ones. Methods and seeds may be added.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cppo_lightning.errors import ConfigError

#: The method that adds no overlay: the base config itself is CPPO.
NO_OVERLAY = "cppo"
EXPERIMENTS = Path("configs") / "experiments"
SETTINGS_FILE = "study-settings.json"
#: Settings a rerun must share with the study on disk (``overlays`` is compared per method).
SHARED = ("configs", "pass_through", "samples", "temperature", "eval_set", "eval_batch_size")
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class Method:
    """One method of the study.

    Attributes:
        name: As given on the command line (``grpo``, ``cppo``, ``path/to/x.yaml``).
        label: The name of its run folders (``<label>-seed<seed>``): the name, or a YAML's stem.
        overlay: Its overlay file (absolute), None for ``cppo``.
    """

    name: str
    label: str
    overlay: Path | None


def repo_root() -> Path:
    """The checkout this package is installed from (``configs/`` lies there in an editable
    install)."""
    return Path(__file__).resolve().parents[3]


def experiment_dirs(cwd: Path | None = None) -> list[Path]:
    """Where method names are looked up: ``configs/experiments`` under the working directory, then
    under the checkout of this package (the same folder when run from the repository)."""
    dirs = [(cwd or Path.cwd()) / EXPERIMENTS, repo_root() / EXPERIMENTS]
    unique: list[Path] = []
    for folder in dirs:
        if folder.resolve() not in [d.resolve() for d in unique]:
            unique.append(folder)
    return unique


def available_methods(cwd: Path | None = None) -> list[str]:
    """The method names that resolve: ``cppo`` and every ``configs/experiments/*.yaml`` stem."""
    names = {NO_OVERLAY}
    for folder in experiment_dirs(cwd):
        if folder.is_dir():
            names |= {p.stem for p in folder.glob("*.yaml")}
    return sorted(names)


def resolve_methods(names: Sequence[str], cwd: Path | None = None) -> list[Method]:
    """The :class:`Method` of each name, in order.

    Raises:
        ConfigError: A name that is neither ``cppo``, an overlay of ``configs/experiments`` nor an
            existing YAML file (listing the overlays), a method given twice, or two methods whose
            run folders would be the same.
    """
    methods: list[Method] = []
    for name in names:
        methods.append(_resolve(name, cwd))
    labels = [m.label for m in methods]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise ConfigError(
            f"--methods: {', '.join(twice)} given twice (or two YAML files with one name): give "
            "each method once, renaming a YAML file if two share a name."
        )
    return methods


def _resolve(name: str, cwd: Path | None) -> Method:
    if name == NO_OVERLAY:
        return Method(name, name, None)
    path = Path(name).expanduser()
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"--methods {name}: no such file; give an existing YAML overlay.")
        return Method(name, _SAFE.sub("_", path.stem), path.resolve())
    for folder in experiment_dirs(cwd):
        candidate = folder / f"{name}.yaml"
        if candidate.is_file():
            return Method(name, name, candidate.resolve())
    raise ConfigError(
        f"--methods {name}: unknown method. Give cppo (no overlay), an overlay of "
        f"configs/experiments ({', '.join(available_methods(cwd))}) or the path of a YAML file."
    )


def file_hash(path: Path) -> str:
    """The sha256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def data_hash(path: Path) -> str | None:
    """The sha256 of a YAML file's data (parsed, keys sorted, as JSON): the same for two files
    that differ only in comments, layout or key order; None for a file that is not YAML or does
    not parse."""
    if path.suffix not in (".yaml", ".yml"):
        return None
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    text = json.dumps(data, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def file_entry(path: Path) -> dict[str, Any]:
    """A file setting: its path, the sha256 of its bytes and of its YAML data
    (:func:`data_hash`)."""
    return {"path": str(path), "sha256": file_hash(path), "data_sha256": data_hash(path)}


def same_file(before: dict[str, Any] | None, now: dict[str, Any] | None) -> bool:
    """Whether two file settings are the same setting: their YAML data when both record it (a
    comment edited since is no change), else their bytes (a study saved before data hashes)."""
    if before is None or now is None:
        return before is None and now is None
    if before.get("data_sha256") and now.get("data_sha256"):
        return bool(before["data_sha256"] == now["data_sha256"])
    return bool(before.get("sha256") == now.get("sha256"))


def study_settings(
    configs: Sequence[Path],
    methods: Sequence[Method],
    pass_through: Sequence[str],
    samples: int,
    temperature: float,
    eval_set: str,
    eval_batch_size: int,
) -> dict[str, Any]:
    """The settings the runs share, as saved in ``study-settings.json``: config files by path and
    content hash (a moved file with the same content is the same setting), each method's overlay
    hash, the pass-through flags in order, the evaluation protocol."""
    eval_path = Path(eval_set).expanduser()
    return {
        "configs": [file_entry(p) for p in configs],
        "pass_through": list(pass_through),
        "samples": samples,
        "temperature": temperature,
        "eval_set": {
            "value": eval_set,
            "sha256": file_hash(eval_path) if eval_path.is_file() else None,
            "data_sha256": data_hash(eval_path) if eval_path.is_file() else None,
        },
        "eval_batch_size": eval_batch_size,
        "overlays": {
            m.label: None if m.overlay is None else file_entry(m.overlay) for m in methods
        },
    }


def _same(key: str, before: Any, now: Any) -> bool:
    """Whether a shared setting is unchanged: a file's content (:func:`same_file`), not its
    path; an eval set that is not a file by its value."""
    if key == "configs":
        return len(before) == len(now) and all(map(same_file, before, now))
    if key == "eval_set":
        if before["sha256"] is None or now["sha256"] is None:
            return bool(before["sha256"] == now["sha256"] and before["value"] == now["value"])
        return same_file(before, now)
    return bool(before == now)


def _shown(key: str, value: Any) -> str:
    if key == "configs":
        return " ".join(f"{c['path']} (sha256 {c['sha256'][:12]})" for c in value)
    if key == "eval_set":
        sha = value["sha256"]
        return value["value"] + (f" (sha256 {sha[:12]})" if sha else "")
    return repr(value)


def _flags_change(before: list[str], now: list[str]) -> str:
    """How the pass-through flags differ: those added, those left out, else their order."""
    added = [a for a in now if a not in before]
    left_out = [a for a in before if a not in now]
    parts = [f"added {' '.join(added)}"] if added else []
    parts += [f"left out {' '.join(left_out)}"] if left_out else []
    if not parts:
        parts = [f"the same flags in another order ({' '.join(before)} -> {' '.join(now)})"]
    return f"pass-through flags: {'; '.join(parts)}"


def compare_settings(previous: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between the settings of a study on disk and of this command, one line each;
    empty when the runs can be compared. Methods only in one of them are not a difference."""
    changes = [
        _flags_change(previous.get(key) or [], current[key])
        if key == "pass_through"
        else f"{key}: {_shown(key, previous.get(key))} -> {_shown(key, current[key])}"
        for key in SHARED
        if key not in previous or not _same(key, previous[key], current[key])
    ]
    old = previous.get("overlays", {})
    for label, overlay in current["overlays"].items():
        if label not in old:
            continue
        if not same_file(old[label], overlay):
            changes.append(
                f"method {label}: overlay "
                f"{'none' if old[label] is None else old[label]['path']} -> "
                f"{'none' if overlay is None else overlay['path']} (its content differs)"
            )
    return changes


def check_settings(output: Path, current: dict[str, Any]) -> dict[str, Any]:
    """The settings to save in ``output``: the study's on disk with this command's methods added.

    Raises:
        ConfigError: ``output`` holds a study made with other settings (saying which, and what to
            do), or a ``study-settings.json`` that does not parse.
    """
    path = output / SETTINGS_FILE
    if not path.is_file():
        return current
    try:
        previous = json.loads(path.read_text())
    except ValueError as error:
        raise ConfigError(
            f"{path} does not parse ({error}): it was damaged; restore it or use another --output."
        ) from None
    changes = compare_settings(previous, current)
    if changes:
        raise ConfigError(
            f"{output} holds a study made with other settings ({'; '.join(changes)}): its runs "
            "could not be compared with new ones. Use another --output for these settings, or "
            "the study's own settings (configs, pass-through flags, --samples, --temperature, "
            "--eval-set, --eval-batch-size, overlays) to continue or extend it."
        )
    return {**previous, "overlays": {**previous.get("overlays", {}), **current["overlays"]}}
