"""The benchmark tasks: GLUE (sst2, cola, mrpc, rte, stsb) and CoNLL-2003 NER."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from datasets import DatasetDict
from transformers import (
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    DataCollatorForTokenClassification,
    DataCollatorWithPadding,
)

from ...data.text import load_conll, load_glue
from ...metrics import conll_compute_metrics, glue_compute_metrics
from .base import ClassifierTask, cap_splits
from .files import align_labels

if TYPE_CHECKING:
    from ..arguments import DataArguments


@dataclass(frozen=True)
class BenchmarkTask(ClassifierTask):
    """A GLUE task or CoNLL-2003 NER on the original files (or their Hub copies): read, tokenized, modelled, scored."""

    name: str  # GLUE task name or "conll2003"; recorded in all_results.json
    label_names: tuple[str, ...] | None  # None: regression (STS-B)
    token_level: bool
    eval_splits: tuple[str, ...]

    @property
    def auto_class(self) -> type:
        return AutoModelForTokenClassification if self.token_level else AutoModelForSequenceClassification

    def check_config(self, config: Any, folder: Path) -> None:
        """Refuse a saved model whose head or labels do not fit this task."""
        self.check_head(config, folder)
        names = [config.id2label[i] for i in sorted(config.id2label)]
        if config.num_labels != self.num_labels:
            raise ValueError(f"{folder} has {config.num_labels} labels {names} but {self.name} has {self.num_labels}: "
                             "evaluate it on the task it was trained for")
        if self.label_names and not all(n == f"LABEL_{i}" for i, n in enumerate(names)) \
                and tuple(names) != self.label_names:
            raise ValueError(f"{folder} has labels {names} but {self.name} has {list(self.label_names)}: evaluate it "
                             "on the task it was trained for")

    def load(self, data_args: DataArguments) -> DatasetDict:
        """The task's splits, with the training subset and the evaluation cap of `data_args` applied."""
        data_dir = data_args.data_dir
        if data_dir is not None and (Path(data_dir) / ("conll2003" if self.token_level else "glue")).is_dir():
            data_dir = str(Path(data_dir) / ("conll2003" if self.token_level else "glue"))
        raw = load_conll(data_dir) if self.token_level else load_glue(self.name, data_dir)
        return cap_splits(raw, data_args, self.eval_splits)

    def tokenize(self, raw: DatasetDict, tokenizer: Any, max_length: int) -> DatasetDict:
        """Model inputs and labels (CoNLL: the tag of each word on its first word piece)."""
        if self.token_level:
            def encode(batch: dict) -> Any:
                enc = tokenizer(batch["tokens"], is_split_into_words=True, truncation=True, max_length=max_length)
                enc["labels"] = [align_labels(enc.word_ids(i), tags) for i, tags in enumerate(batch["ner_tags"])]
                return enc
        else:
            def encode(batch: dict) -> Any:
                texts = [batch["sentence1"]] + ([batch["sentence2"]] if "sentence2" in batch else [])
                return tokenizer(*texts, truncation=True, max_length=max_length)
        columns = next(iter(raw.values())).column_names
        return raw.map(encode, batched=True, remove_columns=[c for c in columns if self.token_level or c != "label"])

    def collator(self, tokenizer: Any) -> Callable:
        return DataCollatorForTokenClassification(tokenizer) if self.token_level else DataCollatorWithPadding(tokenizer)

    def compute_metrics(self) -> Callable:
        return conll_compute_metrics(self.label_names) if self.token_level else glue_compute_metrics(self.name)
