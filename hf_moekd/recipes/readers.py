"""Reading the user's data: one split per file (csv, tsv, json, jsonl, parquet, txt) or saved `datasets` folder, or the
splits of a Hub dataset (`--dataset_name`, or a local folder in its place), with one-line errors that name the source
and the fix."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from datasets import ClassLabel, Dataset, DatasetDict, Sequence, load_dataset, load_from_disk

if TYPE_CHECKING:
    from .arguments import DataArguments

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


def load_hub_dataset(name: str, config: str | None = None) -> DatasetDict:
    """`datasets.load_dataset(name, config)` (the Hub, or a local folder of split files); a `save_to_disk` folder of a
    DatasetDict is read with `load_from_disk`. One error line when it cannot be loaded (offline, unknown name)."""
    folder = Path(name)
    try:
        if folder.is_dir() and (folder / "dataset_dict.json").is_file():
            data = load_from_disk(str(folder))
        else:
            data = load_dataset(name, config)
    except Exception as error:  # noqa: BLE001 - datasets raises many kinds; the user needs one line
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"--dataset_name {name}{f' --dataset_config_name {config}' if config else ''} cannot be "
                         f"loaded ({detail}); online: check the name on the Hub; offline (HF_DATASETS_OFFLINE=1): pass a "
                         "local folder (split files such as train.csv / validation.csv, or a save_to_disk folder)") from None
    if not isinstance(data, DatasetDict):
        raise ValueError(f"--dataset_name {name} is a single split; save it as a DatasetDict with train and validation")
    return data


@dataclass(frozen=True)
class Source:
    """One split to read: a file or datasets folder (`path`), or a split of a loaded Hub dataset (`data`)."""

    where: str  # for messages: "--train_file a.csv" or "--dataset_name glue --dataset_config_name sst2 (train split)"
    path: str | None = None
    data: Dataset | None = None
    role: str = ""  # the file argument without "--", for read_table's messages

    def read(self) -> Dataset:
        if self.data is None:
            return read_table(self.path, self.role)
        if len(self.data) == 0:
            raise ValueError(f"{self.where} holds no rows")
        return self.data


def data_sources(data_args: DataArguments, task: str, splits: tuple[str, ...] = ("train", "validation", "test")
                 ) -> dict[str, Source]:
    """The splits of `--train_file` / `--validation_file` / `--test_file`, or of `--dataset_name`; validation needed."""
    name = getattr(data_args, "dataset_name", None)
    files = {s: getattr(data_args, f"{s}_file", None) for s in splits}
    if name:
        if any(files.values()):
            raise ValueError("pass either --dataset_name or --train_file / --validation_file, not both")
        config = data_args.dataset_config_name
        loaded = load_hub_dataset(name, config)
        if "validation" not in loaded:
            raise ValueError(f"--dataset_name {name} has no 'validation' split (splits: {', '.join(loaded)}); save "
                             "one under that name, or pass --train_file / --validation_file")
        label = f"--dataset_name {name}" + (f" --dataset_config_name {config}" if config else "")
        return {s: Source(f"{label} ({s} split)", data=loaded[s]) for s in splits if s in loaded}
    if not files.get("validation"):
        raise ValueError(f"--task {task} needs --validation_file or --dataset_name (the held-out data to evaluate on)")
    return {s: Source(f"--{s}_file {path}", path=str(path), role=f"{s}_file") for s, path in files.items() if path}


def require_columns(data: Dataset, columns: list[str], where: str, flag: str | None = None) -> None:
    """One clear line naming the first missing column, the columns found and the option (`flag`) that picks it."""
    if missing := [c for c in columns if c not in data.column_names]:
        fix = f"pass {flag} with one of them" if flag else "pass the column name"
        raise ValueError(f"{where} has no column {missing[0]!r} (columns: {', '.join(data.column_names)}); {fix}")


def select_texts(data: Dataset, columns: str | list[str], where: str) -> Dataset:
    """`data` restricted to `columns`, rows with an empty text dropped; one clear error for a missing column or data
    without text."""
    columns = [columns] if isinstance(columns, str) else list(columns)
    require_columns(data, columns, where)
    data = data.filter(lambda row: all(row[c] is not None and str(row[c]).strip() for c in columns))
    if len(data) == 0:
        raise ValueError(f"{where} holds no text")
    return data.select_columns(columns)


def read_texts(path: str | Path, columns: str | list[str], role: str) -> Dataset:
    """`read_table` restricted to `columns` (see `select_texts`)."""
    return select_texts(read_table(path, role), columns, f"--{role} {path}")


def label_names_of(data: Dataset, column: str) -> list[str] | None:
    """The class names a `datasets` ClassLabel column (or a sequence of them, NER tags) declares; None otherwise."""
    feature = data.features.get(column)
    if isinstance(feature, Sequence):
        feature = feature.feature
    elif isinstance(feature, list) and feature:
        feature = feature[0]
    return list(feature.names) if isinstance(feature, ClassLabel) else None
