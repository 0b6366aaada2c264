"""Tasks on the user's own files: `--task text-classification` (csv, tsv, json, jsonl, parquet or a datasets folder;
any label set, or float labels for regression) and `--task ner` (CoNLL-style column files or json/jsonl with tokens and
tags; any BIO / IOB1 tag set). Labels are read from the training data and saved as the model's id2label."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from datasets import Dataset, DatasetDict
from transformers import (
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    DataCollatorForTokenClassification,
    DataCollatorWithPadding,
)

from ...data.text import read_column_file, training_subset
from ...metrics import conll_compute_metrics
from .base import ClassifierTask, cap_splits
from ..readers import Source, data_sources, label_names_of, require_columns, select_texts

if TYPE_CHECKING:
    from ..arguments import DataArguments

TEXT_COLUMN_GUESSES = (("sentence1", "sentence2"), ("question", "sentence"), ("premise", "hypothesis"), ("sentence",),
                       ("text",))
COLUMN_FILE_SUFFIXES = (".txt", ".conll", ".tsv", ".iob", ".bio")
_TAG = re.compile(r"^(?:O|[BI]-.+)$")


@dataclass
class FileTask(ClassifierTask):
    """What the file tasks share: the label set (from the training data, or from a saved model's config)."""

    name: str
    label_names: tuple[str, ...] | None = None
    eval_splits: tuple[str, ...] = ("validation",)
    source: str = field(default="", repr=False)  # where the label set came from, for error messages

    def check_config(self, config: Any, folder: Path) -> None:
        """A saved model of the right head; its label names become the task's (evaluation maps labels by name)."""
        self.check_head(config, folder)
        regression = getattr(config, "problem_type", None) == "regression" or config.num_labels == 1
        self.label_names = None if regression else tuple(config.id2label[i] for i in sorted(config.id2label))
        self.source = str(folder)

    def _ids(self, labels: list[str], split: str, path: str) -> list[int]:
        index = {name: i for i, name in enumerate(self.label_names)}
        if unseen := sorted({label for label in labels if label not in index}):
            raise ValueError(f"{path} ({split}) has labels {unseen} that {self.source or 'the training data'} does not "
                             f"have ({', '.join(self.label_names)}); fix the file or add them to the training data")
        return [index[label] for label in labels]


@dataclass
class TextClassificationTask(FileTask):
    """Sequence classification or regression on csv / tsv / json / jsonl / parquet files or datasets folders."""

    name: str = "text-classification"
    token_level: bool = False
    text_columns: tuple[str, ...] = ()

    @property
    def auto_class(self) -> type:
        return AutoModelForSequenceClassification

    def load(self, data_args: DataArguments) -> DatasetDict:
        sources = data_sources(data_args, self.name)
        label = data_args.label_column_name
        tables = {split: source.read() for split, source in sources.items()}
        for split, table in tables.items():
            require_columns(table, [label], sources[split].where, "--label_column_name")
        columns = self._text_columns(data_args, tables, sources)
        first = "train" if "train" in tables else "validation"
        if not self.source:  # training: the label set comes from the training data
            self._labels_from(tables[first], label, sources[first].where)
        mapped = {}
        for split, table in tables.items():
            data = _named_labels(select_texts(table, [*columns, label], sources[split].where), label,
                                 label_names_of(table, label))
            if len(data) == 0 and split == "test":
                continue  # an unlabelled test split (GLUE's on the Hub): nothing to score
            values = data[label]
            ids = ([float(v) for v in values] if self.label_names is None
                   else self._ids([_label_text(v) for v in values], split, sources[split].where))
            mapped[split] = data.remove_columns(label).add_column("label", ids)
        self.eval_splits = tuple(s for s in ("validation", "test") if s in mapped)
        self.text_columns = tuple(columns)
        return cap_splits(DatasetDict(mapped), data_args, self.eval_splits)

    @staticmethod
    def _text_columns(data_args: DataArguments, tables: dict[str, Dataset], sources: dict[str, Source]) -> list[str]:
        if data_args.text_column_names:
            return [c.strip() for c in data_args.text_column_names.split(",")]
        split, table = next(iter(tables.items()))
        found = set(table.column_names)
        for guess in TEXT_COLUMN_GUESSES:
            if set(guess) <= found:
                return list(guess)
        raise ValueError(f"{sources[split].where}: cannot tell the text column(s) among {sorted(found)}; pass "
                         "--text_column_names a[,b]")

    def _labels_from(self, data: Dataset, label: str, where: str) -> None:
        if names := label_names_of(data, label):  # a datasets ClassLabel: its names, in its order
            self.label_names = tuple(names)
            self.source = f"the training data ({where})"
            return
        values = [v for v in data[label] if v is not None]
        if values and all(isinstance(v, float) for v in values) and any(v != int(v) for v in values):
            self.label_names = None  # regression
        else:
            names = sorted({_label_text(v) for v in values}, key=label_order)
            if len(names) < 2:
                raise ValueError(f"{where} has a single label {names}: classification needs at least two")
            self.label_names = tuple(names)
        self.source = f"the training data ({where})"

    def tokenize(self, raw: DatasetDict, tokenizer: Any, max_length: int) -> DatasetDict:
        columns = self.text_columns

        def encode(batch: dict) -> Any:
            return tokenizer(*[batch[c] for c in columns], truncation=True, max_length=max_length)

        return raw.map(encode, batched=True, remove_columns=list(columns))

    def collator(self, tokenizer: Any) -> Callable:
        return DataCollatorWithPadding(tokenizer)

    def compute_metrics(self) -> Callable:
        regression = self.label_names is None

        def compute(eval_pred: Any) -> dict[str, float]:
            logits = np.asarray(eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple)
                                else eval_pred.predictions)
            labels = np.asarray(eval_pred.label_ids)
            if regression:
                from scipy.stats import pearsonr, spearmanr

                scores = logits.reshape(-1)
                return {"pearson": float(pearsonr(scores, labels)[0]), "spearmanr": float(spearmanr(scores, labels)[0]),
                        "mse": float(((scores - labels) ** 2).mean())}
            from sklearn.metrics import f1_score

            predictions = logits.argmax(-1)
            return {"accuracy": float((predictions == labels).mean()),
                    "f1_macro": float(f1_score(labels, predictions, average="macro", zero_division=0))}

        return compute


@dataclass
class TokenClassificationTask(FileTask):
    """NER / token classification on CoNLL-style column files or json / jsonl with tokens and tags; scored by seqeval."""

    name: str = "ner"
    token_level: bool = True

    @property
    def auto_class(self) -> type:
        return AutoModelForTokenClassification

    def load(self, data_args: DataArguments) -> DatasetDict:
        sources = data_sources(data_args, self.name)
        self.eval_splits = tuple(s for s in ("validation", "test") if s in sources)
        raw = {split: self._read(source, data_args) for split, source in sources.items()}
        if not self.source:
            first = "train" if "train" in raw else "validation"
            names, where = raw[first]["names"], sources[first].where
            if names:  # a ClassLabel column: its tags in its order, the scheme checked
                tag_set([names], where)
            self.label_names = tuple(names) if names else tag_set(raw[first]["tags"], where)
            self.source = f"the training data ({sources[first].where})"
        data = {split: Dataset.from_dict({"tokens": d["tokens"], "ner_tags": [
            self._ids(tags, split, sources[split].where) for tags in d["tags"]]}) for split, d in raw.items()}
        return cap_splits(DatasetDict(data), data_args, self.eval_splits)

    @staticmethod
    def _read(source: Source, data_args: DataArguments) -> dict[str, Any]:
        """Tokens and tag names of one split; `names`: the tag set a ClassLabel column declares (else None)."""
        file = Path(source.path or "")
        if source.path and file.is_file() and file.suffix in COLUMN_FILE_SUFFIXES:
            tokens, tags, _ = read_column_file(file)
            if not tokens:
                raise ValueError(f"{source.where} holds no sentence")
            return {"tokens": tokens, "tags": tags, "names": None}
        table = source.read()
        tags_column = data_args.tags_column_name
        if tags_column == "tags" and "tags" not in table.column_names and "ner_tags" in table.column_names:
            tags_column = "ner_tags"  # the Hub's NER datasets (conll2003, wnut_17, ...)
        names = label_names_of(table, tags_column)
        data = select_texts(table, [data_args.tokens_column_name, tags_column], source.where)
        rows = data[tags_column]
        tags = [[names[x] for x in row] for row in rows] if names else [[str(x) for x in row] for row in rows]
        return {"tokens": [list(t) for t in data[data_args.tokens_column_name]], "tags": tags, "names": names}

    def tokenize(self, raw: DatasetDict, tokenizer: Any, max_length: int) -> DatasetDict:
        def encode(batch: dict) -> Any:
            enc = tokenizer(batch["tokens"], is_split_into_words=True, truncation=True, max_length=max_length)
            enc["labels"] = [align_labels(enc.word_ids(i), tags) for i, tags in enumerate(batch["ner_tags"])]
            return enc

        return raw.map(encode, batched=True, remove_columns=["tokens", "ner_tags"])

    def collator(self, tokenizer: Any) -> Callable:
        return DataCollatorForTokenClassification(tokenizer)

    def compute_metrics(self) -> Callable:
        return conll_compute_metrics(self.label_names)


def align_labels(word_ids: list[int | None], tags: list[int]) -> list[int]:
    """Tag of each word on its first word piece, -100 on special tokens and continuation pieces."""
    labels, previous = [], None
    for word in word_ids:
        labels.append(-100 if word is None or word == previous else tags[word])
        previous = word
    return labels


def _named_labels(data: Dataset, label: str, names: list[str] | None) -> Dataset:
    """ClassLabel ids as their names; rows labelled -1 (unlabelled, as GLUE's test split on the Hub) dropped."""
    if not names:
        return data
    data = data.filter(lambda row: row[label] is not None and row[label] >= 0)
    if len(data) == 0:
        return data
    named = data.map(lambda row: {"__name": names[row[label]]}, remove_columns=[label])
    return named.rename_column("__name", label)


def label_order(name: str) -> tuple[bool, int, str]:
    """Sort key of label names read from data: numbers by value first, then the other names alphabetically."""
    number = name.lstrip("-").isdigit()
    return not number, int(name) if number else 0, name


def _label_text(value: Any) -> str:
    """A label as its name: integral floats (csv readers make them) without ".0"."""
    return str(int(value)) if isinstance(value, float) and value == int(value) else str(value)


def tag_set(rows: list[list[str]], path: str) -> tuple[str, ...]:
    """The tags of a BIO / IOB1 file, "O" first, then by entity type (B before I); one error for other schemes."""
    tags = {t for row in rows for t in row}
    if bad := sorted(t for t in tags if not _TAG.match(t)):
        raise ValueError(f"{path}: tags {bad[:5]} are not BIO / IOB1 ('O', 'B-TYPE', 'I-TYPE'); mixed or other tag "
                         "schemes (BIOES, plain types) are not supported: convert the file to BIO")
    types = sorted({t[2:] for t in tags if t != "O"})
    return ("O", *(f"{p}-{t}" for t in types for p in "BI" if f"{p}-{t}" in tags))
