"""Load GLUE (SST-2, CoLA, MRPC, RTE, STS-B) and CoNLL-2003 NER as `datasets.DatasetDict`s.

With a ``data_dir`` the original files are read (GLUE TSVs, CoNLL ``token<TAB>tag``); with
``data_dir=None`` the Hugging Face Hub copies are loaded and given the same columns.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import datasets
from datasets import ClassLabel, DatasetDict, Features, Sequence, Value

CONLL_LABELS: tuple[str, ...] = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")
CONLL_FILES = {"train": "train.txt", "validation": "valid.txt", "test": "test.txt"}
GLUE_FILES = {"train": "train.tsv", "validation": "dev.tsv"}
GLUE_HUB_ID, CONLL_HUB_ID = "nyu-mll/glue", "eriktks/conll2003"  # the Hub copies of the data (also model card metadata)


@dataclass(frozen=True)
class GlueTask:
    """A GLUE task: where its files live and how their columns map to ``sentence1[, sentence2], label``."""

    name: str  # registry key, also the Hub and metric config name
    folder: str  # sub-folder of data_dir holding train.tsv and dev.tsv
    text_columns: tuple[str, ...]  # 1 or 2 file columns, become sentence1[, sentence2]
    label_column: str
    label_names: tuple[str, ...] | None  # class names by id; None for regression
    metrics: tuple[str, ...]
    file_labels: tuple[str, ...] | None = None  # label strings in the files by id, when not "0", "1", ...
    file_columns: tuple[str, ...] | None = None  # column names of header-less files

    @property
    def is_regression(self) -> bool:
        return self.label_names is None

    @property
    def num_labels(self) -> int:
        return 1 if self.label_names is None else len(self.label_names)


GLUE_TASKS: dict[str, GlueTask] = {
    "sst2": GlueTask("sst2", "SST-2", ("sentence",), "label", ("negative", "positive"), ("accuracy",)),
    "cola": GlueTask(
        "cola", "CoLA", ("sentence",), "label", ("unacceptable", "acceptable"), ("matthews_correlation",),
        file_columns=("source", "label", "author_mark", "sentence"),
    ),
    "mrpc": GlueTask(
        "mrpc", "MRPC", ("#1 String", "#2 String"), "Quality", ("not_equivalent", "equivalent"), ("accuracy", "f1")
    ),
    "rte": GlueTask(
        "rte", "RTE", ("sentence1", "sentence2"), "label", ("entailment", "not_entailment"), ("accuracy",),
        file_labels=("entailment", "not_entailment"),
    ),
    "stsb": GlueTask("stsb", "STS-B", ("sentence1", "sentence2"), "score", None, ("pearson", "spearmanr")),
}


def get_glue_task(name: str) -> GlueTask:
    """Look up a task case-insensitively, accepting the folder spelling too ("SST-2", "sts-b")."""
    task = GLUE_TASKS.get(name.lower().replace("-", ""))
    if task is None:
        raise ValueError(f"Unknown GLUE task {name!r}; choose one of: {', '.join(GLUE_TASKS)}")
    return task


def glue_label_names(task: str | GlueTask) -> list[str] | None:
    """Class names by id, or None for the regression task STS-B."""
    task = get_glue_task(task) if isinstance(task, str) else task
    return None if task.label_names is None else list(task.label_names)


def load_glue(task_name: str, data_dir: str | Path | None = None) -> DatasetDict:
    """Load a GLUE task as splits train/validation with columns sentence1[, sentence2], label.

    ``data_dir`` is the folder holding SST-2/, CoLA/, ... (each with train.tsv and dev.tsv);
    None loads ``nyu-mll/glue`` from the Hub. Labels are ClassLabel ids, or float32 for STS-B.
    """
    task = get_glue_task(task_name)
    if data_dir is None:
        hub = datasets.load_dataset(GLUE_HUB_ID, task.name)
        splits = DatasetDict({split: hub[split] for split in GLUE_FILES})
        if len(task.text_columns) == 1:
            splits = splits.rename_column("sentence", "sentence1")
        return splits.remove_columns("idx")
    folder = Path(data_dir) / task.folder
    return DatasetDict({split: _read_glue_file(task, folder / name) for split, name in GLUE_FILES.items()})


def load_conll(data_dir: str | Path | None = None) -> DatasetDict:
    """Load CoNLL-2003 NER as splits train/validation/test with columns tokens, ner_tags.

    ``data_dir`` holds train.txt, valid.txt and test.txt (``token<TAB>tag`` lines, blank line between
    sentences); None loads ``eriktks/conll2003`` from the Hub. Tags are ClassLabel ids in CONLL_LABELS order.
    """
    if data_dir is None:
        hub = datasets.load_dataset(CONLL_HUB_ID, revision="refs/convert/parquet")
        return hub.select_columns(["tokens", "ner_tags"])
    tags = ClassLabel(names=list(CONLL_LABELS))
    features = Features({"tokens": Sequence(Value("string")), "ner_tags": Sequence(tags)})
    return DatasetDict(
        {
            split: datasets.Dataset.from_dict(_read_conll_file(Path(data_dir) / name), features=features)
            for split, name in CONLL_FILES.items()
        }
    )


def _require_file(path: Path, holder: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(
            f"Data file not found: {path}; pass --data_dir pointing at the folder that holds {holder}"
        )


def _read_glue_file(task: GlueTask, path: Path) -> datasets.Dataset:
    _require_file(path, "SST-2/, CoLA/, MRPC/, RTE/, STS-B/")
    _check_tsv_layout(task, path)
    wanted = [*task.text_columns, task.label_column]
    ds = datasets.load_dataset(
        "csv",
        data_files=str(path),
        split="train",
        delimiter="\t",
        quoting=csv.QUOTE_NONE,
        encoding="utf-8-sig",  # MRPC starts with a byte-order mark
        na_filter=False,  # keep "", "NA", "null" ... as text
        column_names=list(task.file_columns) if task.file_columns else None,
        features=Features({column: Value("string") for column in wanted}),  # also selects these columns
    )
    renames = {column: f"sentence{i}" for i, column in enumerate(task.text_columns, 1)}
    renames[task.label_column] = "label"
    ds = ds.rename_columns({old: new for old, new in renames.items() if old != new})
    return _encode_labels(task, path, ds)


def _check_tsv_layout(task: GlueTask, path: Path) -> None:
    """Check the header and that every row has as many tab-separated fields (pandas misreads ragged rows)."""
    with path.open(encoding="utf-8-sig") as f:
        columns = list(task.file_columns) if task.file_columns else f.readline().rstrip("\n").split("\t")
        expected = [*task.text_columns, task.label_column]
        if not set(expected) <= set(columns):
            raise ValueError(
                f"{path}: expected columns {expected}, found {columns}; use the original GLUE {task.folder} file"
            )
        rows = 0
        for rows, line in enumerate(f, 1):
            if (found := line.count("\t") + 1) != len(columns):
                lineno = rows if task.file_columns else rows + 1
                raise ValueError(
                    f"{path}:{lineno}: expected {len(columns)} tab-separated fields {columns}, found {found}; "
                    f"use the original GLUE {task.folder} file"
                )
    if rows == 0:
        raise ValueError(f"{path}: no data rows; use the original GLUE {task.folder} file")


def _encode_labels(task: GlueTask, path: Path, ds: datasets.Dataset) -> datasets.Dataset:
    """Turn the label strings into ClassLabel ids (float32 for regression), rejecting unknown values."""
    features = ds.features.copy()
    if task.label_names is None:
        bad = [value for value in ds.unique("label") if not _is_float(value)]
        allowed, convert = "numbers", float
        features["label"] = Value("float32")
    else:
        ids = {value: i for i, value in enumerate(task.file_labels or map(str, range(task.num_labels)))}
        bad = sorted(set(ds.unique("label")) - ids.keys())
        allowed, convert = ", ".join(ids), ids.__getitem__
        features["label"] = ClassLabel(names=list(task.label_names))
    if bad:
        raise ValueError(
            f"{path}: unknown label {bad[0]!r} in column {task.label_column!r} (allowed: {allowed}); "
            "fix or drop those rows"
        )
    return ds.map(
        lambda labels: {"label": [convert(value) for value in labels]},
        input_columns="label",
        batched=True,
        features=features,
    )


def _is_float(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def read_column_file(path: str | Path) -> tuple[list[list[str]], list[list[str]], list[list[int]]]:
    """CoNLL-style column file: `token<TAB or spaces>...tag` per line (token first, tag last), a blank line between
    sentences, `-DOCSTART-` lines skipped. Returns tokens, tags and line numbers, per sentence."""
    path = Path(path)
    sentences: list[list[str]] = []
    tag_rows: list[list[str]] = []
    line_rows: list[list[int]] = []
    tokens: list[str] = []
    tags: list[str] = []
    lines: list[int] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.rstrip("\r\n").split("\t") if "\t" in line else line.split()
            if not fields or fields[0] == "-DOCSTART-":
                if tokens:
                    sentences.append(tokens)
                    tag_rows.append(tags)
                    line_rows.append(lines)
                    tokens, tags, lines = [], [], []
                continue
            if len(fields) < 2:
                raise ValueError(f"{path}:{lineno}: expected 'token<TAB>tag', found {line.rstrip()!r}")
            tokens.append(fields[0])
            tags.append(fields[-1].strip())
            lines.append(lineno)
    if tokens:
        sentences.append(tokens)
        tag_rows.append(tags)
        line_rows.append(lines)
    return sentences, tag_rows, line_rows


def _read_conll_file(path: Path) -> dict[str, list[list]]:
    """Parse ``token<TAB>tag`` (or space-separated CoNLL columns, tag last) into tokens and CoNLL-2003 tag ids."""
    _require_file(path, "train.txt, valid.txt and test.txt")
    tag_ids = {tag: i for i, tag in enumerate(CONLL_LABELS)}
    sentences, tag_rows, line_rows = read_column_file(path)
    for tags, lines in zip(tag_rows, line_rows):
        for tag, lineno in zip(tags, lines):
            if tag not in tag_ids:
                raise ValueError(f"{path}:{lineno}: unknown NER tag {tag!r} (allowed: {', '.join(CONLL_LABELS)}); for "
                                 "another tag set use --task ner --train_file ...")
    return {"tokens": sentences, "ner_tags": [[tag_ids[t] for t in tags] for tags in tag_rows]}


CORPUS_SOURCES: tuple[str, ...] = ("sst2", "cola", "mrpc", "rte", "stsb", "conll")


def load_text_corpus(data_dir: str | Path | None = None, sources: tuple[str, ...] | list[str] = CORPUS_SOURCES) -> datasets.Dataset:
    """Unlabelled sentences for task-agnostic distillation: the train splits of `sources`, one `text` column.

    ``data_dir`` holds glue/ and conll2003/ (None: the Hub copies). Every GLUE text column counts (both sentences of
    a pair), CoNLL sentences are their tokens joined by spaces; exact duplicates and empty lines are dropped, the
    first occurrence kept, so the corpus is the same on every run. Dev and test splits are never read.
    """
    unknown = sorted(set(sources) - set(CORPUS_SOURCES))
    if unknown or not sources:
        raise ValueError(f"Unknown corpus sources {unknown or list(sources)}: choose from {', '.join(CORPUS_SOURCES)}.")
    root = None if data_dir is None else Path(data_dir)
    texts: list[str] = []
    for source in sources:
        if source == "conll":
            train = load_conll(None if root is None else root / "conll2003")["train"]
            texts += [" ".join(tokens) for tokens in train["tokens"]]
        else:
            train = load_glue(source, None if root is None else root / "glue")["train"]
            texts += [t for column in ("sentence1", "sentence2") if column in train.column_names for t in train[column]]
    unique = list(dict.fromkeys(t.strip() for t in texts if t and t.strip()))
    return datasets.Dataset.from_dict({"text": unique})


def training_subset(dataset: datasets.Dataset, size: int | None) -> datasets.Dataset:
    """A fixed random subset of `size` rows (shuffle seed 42, the same on every run); all rows when `size` is None."""
    if not size:
        return dataset
    return dataset.shuffle(seed=42).select(range(min(size, len(dataset))))
