"""An empty dataset file is refused by name, saying it has no rows, not with a parser's error."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cppo_lightning.data import DatasetSpec


def _empty_jsonl(path: Path) -> None:
    path.write_text("")


def _blank_jsonl(path: Path) -> None:
    path.write_text("\n  \n")


def _zero_byte_parquet(path: Path) -> None:
    path.write_bytes(b"")


def _zero_row_parquet(path: Path) -> None:
    pq.write_table(pa.table({"question": pa.array([], pa.string())}), path)


def _header_only_csv(path: Path) -> None:
    path.write_text("question,answer,image\n")


@pytest.mark.parametrize(
    ("name", "write"),
    [
        ("train.jsonl", _empty_jsonl),
        ("blank.jsonl", _blank_jsonl),
        ("empty.parquet", _zero_byte_parquet),
        ("zero_rows.parquet", _zero_row_parquet),
        ("header.csv", _header_only_csv),
    ],
)
def test_an_empty_dataset_file_is_named_and_said_to_have_no_rows(tmp_path, name, write):
    """Loading an empty .jsonl/.parquet/.csv split raises a ValueError that names the file and
    says it has no rows (instead of a bare StopIteration or an Arrow error)."""
    path = tmp_path / name
    write(path)
    with pytest.raises(ValueError, match=rf"{name}.* has no rows"):
        DatasetSpec(path=str(path)).load()
