"""Datasets from the Hugging Face hub or local files (parquet, json/jsonl, csv, image folders).

    data:
      dataset:
        class_path: cppo_lightning.data.HFDataset
        init_args:
          train: {path: TIGER-Lab/ViRL39K, image_root: /data/ViRL39K}
          validation: {path: hiyouga/geometry3k, split: test}

Column names are matched by the DataModule (``question``/``problem``, ``image``/``images``,
``answer``/``solution``...) or mapped explicitly with ``columns``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import datasets

from cppo_lightning.data.rows import element_feature, is_url

_FILE_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}
# Suffixes that make a name a file, never a hub dataset (hub ids are `name` or `owner/name`).
_FILE_SUFFIXES = {
    *_FILE_BUILDERS,
    *(".arrow", ".tsv", ".txt", ".yaml", ".yml", ".zip", ".gz", ".bz2", ".xz", ".zst", ".tar"),
}
# Text formats whose rows must be UTF-8 (pyarrow's json reader does not check: a bad byte
# surfaces later, from some row's read, naming neither the file nor the row).
_TEXT_SUFFIXES = {".json", ".jsonl", ".csv", ".tsv", ".txt"}


class DataFileMissing(FileNotFoundError, ValueError):
    """A dataset path that names a local file or folder that does not exist."""


@dataclasses.dataclass
class DatasetSpec:
    """One split of a dataset.

    Args:
        path: Hub name (``hiyouga/geometry3k``), a local directory (parquet/json files named by
            split, or an image folder with ``metadata.jsonl``), or one local file (``.parquet``,
            ``.json``, ``.jsonl``, ``.csv``).
        split: Split to read (a single local file is always its own ``train`` split).
        name: Hub configuration name, if the dataset has several.
        data_files: Files to read inside ``path`` (``datasets.load_dataset``'s ``data_files``).
        revision: Hub revision (branch, tag or commit) to pin.
        image_root: Folder that relative image paths in the image column are relative to;
            the file's (or directory's) own folder when None.
        columns: Renames applied first, ``{our name: dataset column}``, e.g.
            ``{question: problem, image: images, answer: solution}``.
        num_rows: Keep only the first ``num_rows`` rows (smoke runs).
    """

    path: str
    split: str = "train"
    name: str | None = None
    data_files: str | list[str] | dict[str, str | list[str]] | None = None
    revision: str | None = None
    image_root: str | None = None
    columns: dict[str, str] | None = None
    num_rows: int | None = None

    def load(self, key: str = "path") -> datasets.Dataset:
        """Read the split; relative image paths are made absolute.

        Args:
            key: The config key ``path`` came from, named in errors (e.g.
                ``data.dataset.init_args.train.path``).

        Raises:
            DataFileMissing: ``path`` looks like a local file or folder (a data suffix such as
                ``.jsonl``, a leading ``/``, ``.`` or ``~``, or a folder that exists here) and
                does not exist; checked before ``datasets`` is called, so a typo is never
                looked up on the hub.
            ValueError: The file is empty, not UTF-8 (naming the line), or lacks a column.
        """
        local = Path(self.path).expanduser()
        if not local.exists() and _names_a_local_path(self.path):
            absolute = "" if local.is_absolute() else f" (looked for {local.absolute()})"
            raise DataFileMissing(
                f"{key}: no such file or folder {self.path!r}{absolute}: fix the path, or give "
                "a hub dataset name (owner/name)."
            )
        if local.is_file():
            builder = _FILE_BUILDERS.get(local.suffix.lower())
            if builder is None:
                raise ValueError(
                    f"cannot read {self.path!r}: give a .parquet, .json, .jsonl or .csv file, a "
                    "directory, or a hub dataset name."
                )
            if not _has_rows(local):
                raise ValueError(_no_rows(self.path))
            try:
                dataset = datasets.load_dataset(builder, data_files=str(local), split="train")
            except Exception as error:  # a parser's error: say which line is not UTF-8, if one
                _raise_if_not_utf8([local], key, error)
                raise
            root: str | None = self.image_root or str(local.parent)
        else:
            try:
                dataset = datasets.load_dataset(
                    str(local) if local.is_dir() else self.path,
                    self.name,
                    data_files=self.data_files,
                    split=self.split,
                    revision=self.revision,
                )
            except Exception as error:
                message = str(error)
                no_split = "split" in message.lower() and self.split in message
                if isinstance(error, ValueError) and no_split:
                    raise ValueError(
                        f"{self.path!r} has no split {self.split!r} ({error}): set the spec's "
                        "`split`."
                    ) from error
                if local.is_dir():
                    _raise_if_not_utf8(_text_files(local), key, error)
                raise
            root = self.image_root or (str(local) if local.is_dir() else None)
        assert isinstance(dataset, datasets.Dataset)
        texts = [local] if local.is_file() else _text_files(local) if local.is_dir() else []
        if any(path.suffix.lower() in _TEXT_SUFFIXES for path in texts):
            try:  # UTF-8 of every string, at C speed (GB/s)
                dataset.data.table.validate(full=True)
            except Exception as error:
                _raise_if_not_utf8(texts, key, error)
                raise
        if len(dataset) == 0:
            raise ValueError(_no_rows(self.path, self.split))
        if self.columns:
            absent = [source for source in self.columns.values() if source not in dataset.features]
            if absent:
                raise ValueError(
                    f"{self.path!r} ({self.split}) has no column(s) {absent} named in `columns`; "
                    f"its columns are {dataset.column_names}."
                )
            renames = {source: ours for ours, source in self.columns.items() if source != ours}
            dataset = dataset.rename_columns(renames)
        if self.num_rows is not None:
            dataset = dataset.select(range(min(self.num_rows, len(dataset))))
        return _absolute_image_paths(dataset, root)


def _names_a_local_path(path: str) -> bool:
    """Whether a name that does not exist here is a local file or folder (a typo to report)
    rather than a hub dataset id (``name`` or ``owner/name``)."""
    if is_url(path):
        return False  # hf://..., s3://...: for datasets to resolve
    if Path(path).suffix.lower() in _FILE_SUFFIXES:
        return True
    if path.startswith(("/", ".", "~")) or (os.sep != "/" and os.sep in path):
        return True
    parts = path.split("/")
    return len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).expanduser().is_dir())


def _text_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in _TEXT_SUFFIXES)


def first_non_utf8_line(path: Path) -> tuple[int, int, int] | None:
    """``(line number, column, byte)`` of the first byte of ``path`` that is not UTF-8 (both
    counted from 1), or None when the whole file decodes."""
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as error:
                return number, error.start + 1, line[error.start]
    return None


def _raise_if_not_utf8(files: list[Path], key: str, error: BaseException) -> None:
    """Raise a ValueError naming the first line of ``files`` that is not UTF-8 (if any)."""
    for path in files:
        found = first_non_utf8_line(path)
        if found is not None:
            line, column, byte = found
            raise ValueError(
                f"{key}: {str(path)!r} line {line} is not UTF-8 (byte 0x{byte:02x} at column "
                f"{column}): re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)."
            ) from error


def _no_rows(path: str, split: str | None = None) -> str:
    where = f"{path!r}" + (f" (split {split!r})" if split and not Path(path).is_file() else "")
    return f"{where} has no rows: give a file (or split) that holds the dataset's rows."


def _has_rows(path: Path) -> bool:
    """Whether a local data file holds at least one row, read cheaply (parquet's footer, the
    first non-blank lines of text files); an empty file makes the readers fail obscurely."""
    if path.stat().st_size == 0:
        return False
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(path).metadata.num_rows > 0
        except Exception:  # not a parquet file: let the reader say so
            return True
    if suffix in (".jsonl", ".csv"):
        needed = 2 if suffix == ".csv" else 1  # a csv's first line is its header
        found = 0
        with path.open("rb") as handle:
            for line in handle:
                found += bool(line.strip())
                if found >= needed:
                    return True
        return False
    return True


def _absolute_image_paths(dataset: datasets.Dataset, root: str | None) -> datasets.Dataset:
    """Make relative path strings in image-like string columns absolute against ``root``."""
    if root is None:
        return dataset
    columns = [name for name, feature in dataset.features.items() if _is_path_column(name, feature)]
    if not columns:
        return dataset

    # A module-level function with keyword arguments, so that datasets can fingerprint the
    # step (a lambda gets a random fingerprint and defeats every cache after it).
    return dataset.map(
        _absolute_row, fn_kwargs={"columns": columns, "root": root}, desc="image paths"
    )


def _absolute(value: Any, root: str) -> Any:
    # A URL is left as it is: the row check counts it as not fetched (not as a missing file).
    if isinstance(value, str) and value and not os.path.isabs(value) and not is_url(value):
        return os.path.join(root, value)
    if isinstance(value, list):
        return [_absolute(v, root) for v in value]
    return value


def _absolute_row(row: dict[str, Any], columns: list[str], root: str) -> dict[str, Any]:
    return {column: _absolute(row[column], root) for column in columns}


def _is_path_column(name: str, feature: Any) -> bool:
    if "image" not in name.lower():
        return False
    inner = element_feature(feature) or feature  # a list column's element, or the column
    return isinstance(inner, datasets.Value) and inner.dtype in ("string", "large_string")


class HFDataset:
    """Train and validation splits from the hub or local files.

    Args:
        train: The training split.
        validation: The held-out split (e.g. Geometry3K ``test`` for a ViRL39K run); when None,
            ``validation_size`` rows are held out of ``train`` (seeded).
        validation_size: Rows held out of ``train`` when ``validation`` is None.
        seed: Seed of that hold-out.
    """

    def __init__(
        self,
        train: DatasetSpec,
        validation: DatasetSpec | None = None,
        validation_size: int = 256,
        seed: int = 0,
    ) -> None:
        if validation is None and validation_size < 1:
            raise ValueError(
                "data.dataset.validation is null, so validation_size rows are held out of train: "
                f"it must be >= 1, got {validation_size}."
            )
        self.train = train
        self.validation = validation
        self.validation_size = validation_size
        self.seed = seed

    def load(self) -> datasets.DatasetDict:
        train = self.train.load(key="data.dataset.init_args.train.path")
        if self.validation is not None:
            validation = self.validation.load(key="data.dataset.init_args.validation.path")
            return datasets.DatasetDict(train=train, validation=validation)
        if self.validation_size >= len(train):
            raise ValueError(
                f"cannot hold out validation_size={self.validation_size} rows of a "
                f"{len(train)}-row train split: lower data.dataset.validation_size or give a "
                "validation spec."
            )
        split = train.train_test_split(test_size=self.validation_size, seed=self.seed)
        return datasets.DatasetDict(train=split["train"], validation=split["test"])
