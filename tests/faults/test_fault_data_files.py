"""A data or eval-set file that does not exist is named with its config key, before `datasets` is
called (no 30 s hub lookup for a typo); a text file that is not UTF-8 is named with its line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import pytest

from cppo_lightning.data import DatasetSpec, HFDataset
from cppo_lightning.evaluation.sets import EvalSet, load_eval_set


@pytest.fixture
def no_load_dataset(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """``datasets.load_dataset`` fails the test if it is called (it would go to the hub)."""
    calls: list[Any] = []

    def refuse(*args: Any, **kwargs: Any) -> None:
        calls.append(args)
        raise AssertionError(f"datasets.load_dataset{args} was called")

    monkeypatch.setattr(datasets, "load_dataset", refuse)
    return calls


@pytest.mark.parametrize(
    "path",
    ["nodir/train.jsonl", "train.parquet", "./nodata", "~/no/such/folder", "data/typo"],
)
def test_a_missing_data_file_is_named_with_its_key_before_datasets_is_called(
    tmp_path, monkeypatch, no_load_dataset, path
):
    """A relative typo (`nodir/train.jsonl`), a file name with a data suffix, a path starting
    with `.` or `~`, or a missing entry of a folder that exists here (`data/` exists, so
    `data/typo` is local) is refused as missing, naming the path and the config key, without
    calling datasets (which looked `nodir/train.jsonl` up on the hub for 30 s first)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    spec = DatasetSpec(path=path)
    with pytest.raises(FileNotFoundError) as raised:
        HFDataset(train=spec, validation=spec).load()
    message = str(raised.value)
    assert "\n" not in message
    assert f"data.dataset.init_args.train.path: no such file or folder {path!r}" in message
    assert isinstance(raised.value, ValueError)  # `cppo evaluate` reports ValueErrors in one line
    assert no_load_dataset == []


def test_a_hub_name_still_goes_to_datasets(monkeypatch, tmp_path):
    """`owner/name` (no data suffix, no such local folder `owner`) is still a hub dataset."""
    monkeypatch.chdir(tmp_path)
    called: list[str] = []

    def load(path: str, *args: Any, **kwargs: Any) -> None:
        called.append(path)
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", load)
    with pytest.raises(ConnectionError):
        DatasetSpec(path="hiyouga/geometry3k").load()
    assert called == ["hiyouga/geometry3k"]


def test_a_missing_eval_set_file_is_named_with_its_key(tmp_path, monkeypatch, no_load_dataset):
    """An eval set whose dataset path does not exist names the set, `dataset.path` and the YAML
    file it came from (or `--eval`'s path for an inline set), before datasets is called."""
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "mine.yaml"
    config.write_text("name: mine\ndataset:\n  path: nodir/test.jsonl\n")
    with pytest.raises(FileNotFoundError, match=r"nodir/test\.jsonl") as raised:
        load_eval_set(str(config)).load(processor=None)
    assert f"eval set 'mine': dataset.path in {config}: no such file" in str(raised.value)
    with pytest.raises(FileNotFoundError, match=r"--eval's path: no such file.*'nodir/x\.csv'"):
        load_eval_set("{path: nodir/x.csv}").load(processor=None)
    with pytest.raises(FileNotFoundError, match=r"missing\.parquet': fix the path"):
        EvalSet("inline", DatasetSpec(path=str(tmp_path / "missing.parquet"))).raw_rows()
    assert no_load_dataset == []


def _latin1_rows(path: Path) -> None:
    """Three rows, the second with a Latin-1 'é' (byte 0xe9): not UTF-8."""
    rows = [{"question": q, "answer": "1", "image": "a.png"} for q in ("one", "café", "three")]
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    path.write_bytes(text.encode("latin-1"))


def _latin1_csv(path: Path) -> None:
    path.write_bytes("question,answer,image\none,1,a.png\ncafé,2,a.png\n".encode("latin-1"))


def _latin1_json(path: Path) -> None:
    path.write_bytes(
        '[\n{"question": "one", "answer": "1"},\n{"question": "café"}\n]'.encode("latin-1")
    )


@pytest.mark.parametrize(
    ("name", "write", "line", "column"),
    [
        ("train.jsonl", _latin1_rows, 2, 18),  # é follows the 17 bytes {"question": "caf
        ("train.csv", _latin1_csv, 3, 4),
        ("train.json", _latin1_json, 3, 18),
    ],
)
def test_a_file_that_is_not_utf8_is_named_with_its_line(tmp_path, name, write, line, column):
    """A jsonl/csv/json file with a non-UTF-8 byte is refused when loaded, naming the config key,
    the file, the line and the byte, and saying to re-encode it as UTF-8. Before, the jsonl
    loaded and a row's read later raised pyarrow's UnicodeDecodeError naming neither file nor
    row; csv and json raised a DatasetGenerationError."""
    path = tmp_path / name
    write(path)
    spec = DatasetSpec(path=str(path))
    with pytest.raises(ValueError) as raised:
        HFDataset(train=spec, validation=spec).load()
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("data.dataset.init_args.train.path: ")
    assert f"{str(path)!r} line {line} is not UTF-8 (byte 0xe9 at column {column})" in message
    assert "re-encode the file as UTF-8" in message


def test_a_folder_with_a_file_that_is_not_utf8_names_that_file(tmp_path):
    """In a folder of split files, the file and line that are not UTF-8 are named."""
    folder = tmp_path / "data"
    folder.mkdir()
    row = {"question": "q", "answer": "1", "image": "a.png"}
    (folder / "train.jsonl").write_text(json.dumps(row) + "\n")
    _latin1_rows(folder / "test.jsonl")
    with pytest.raises(ValueError, match=r"test\.jsonl' line 2 is not UTF-8"):
        DatasetSpec(path=str(folder), split="test").load()
