"""Reading the user's data files: one split per file (csv, tsv, json, jsonl, parquet, txt) or saved `datasets`
folder, with one-line errors that name the file and the fix."""
from __future__ import annotations

from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

# file suffix -> the `datasets` builder that reads it
LOADERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv",
           ".parquet": "parquet"}


def read_table(path: str | Path, role: str) -> Dataset:
    """One split as a `Dataset`: a .txt file (a text per line, column "text"), .json/.jsonl/.csv/.tsv/.parquet or a
    saved `datasets` folder; one clear error for a missing file, an unknown format or an empty file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--{role} {path} does not exist")
    if path.is_dir():
        data = load_from_disk(str(path))
        if isinstance(data, DatasetDict):
            raise ValueError(f"--{role} {path} is a DatasetDict folder; point at one split's folder (e.g. {path}/train)")
    elif path.suffix in LOADERS:
        if path.stat().st_size == 0:
            raise ValueError(f"--{role} {path} is empty")
        extra = {"delimiter": "\t"} if path.suffix == ".tsv" else {}
        data = load_dataset(LOADERS[path.suffix], data_files=str(path), split="train", **extra)
    else:
        raise ValueError(f"--{role} {path}: unknown file type {path.suffix!r}; use .txt (a text per line), .json, "
                         ".jsonl, .csv, .tsv, .parquet or a datasets folder")
    if len(data) == 0:
        raise ValueError(f"--{role} {path} holds no rows")
    return data


def require_columns(data: Dataset, columns: list[str], path: str | Path, role: str) -> None:
    if missing := [c for c in columns if c not in data.column_names]:
        raise ValueError(f"--{role} {path} has no column {missing[0]!r} (columns: {', '.join(data.column_names)}); "
                         "pass the column name")


def read_texts(path: str | Path, columns: str | list[str], role: str) -> Dataset:
    """`read_table` restricted to `columns`, rows with an empty text dropped; one clear error for a missing column or
    a file without text."""
    columns = [columns] if isinstance(columns, str) else list(columns)
    data = read_table(path, role)
    require_columns(data, columns, path, role)
    data = data.filter(lambda row: all(row[c] is not None and str(row[c]).strip() for c in columns))
    if len(data) == 0:
        raise ValueError(f"--{role} {path} holds no text")
    return data.select_columns(columns)
