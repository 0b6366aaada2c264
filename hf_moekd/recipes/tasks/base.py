"""What every task of the text recipes provides (`Task`), and what the classification tasks share."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol, runtime_checkable

from datasets import DatasetDict

from ...data.text import training_subset

if TYPE_CHECKING:
    from ..arguments import DataArguments


@runtime_checkable
class Task(Protocol):
    """A task of `hf-moekd distill` / `evaluate`: how its data is read, tokenized, modelled and scored."""

    name: str
    label_names: tuple[str, ...] | None
    eval_splits: tuple[str, ...]

    @property
    def auto_class(self) -> type: ...

    def head_kwargs(self) -> dict[str, Any]: ...

    def sequence_length(self, data_args: DataArguments) -> int: ...

    def load(self, data_args: DataArguments) -> DatasetDict: ...

    def tokenize(self, raw: DatasetDict, tokenizer: Any, max_length: int) -> DatasetDict: ...

    def collator(self, tokenizer: Any) -> Callable: ...

    def compute_metrics(self) -> Callable | None: ...

    def add_metrics(self, metrics: dict[str, float]) -> dict[str, float]: ...

    def check_config(self, config: Any, folder: Path) -> None: ...


def cap_splits(raw: DatasetDict, data_args: DataArguments, splits: tuple[str, ...]) -> DatasetDict:
    """`raw` with the training subset and the evaluation cap of `data_args` applied (in place)."""
    if "train" in raw:
        raw["train"] = training_subset(raw["train"], data_args.max_train_samples)
    if data_args.max_eval_samples:
        for split in splits:
            raw[split] = raw[split].select(range(min(data_args.max_eval_samples, len(raw[split]))))
    return raw


class ClassifierTask:
    """What the classification tasks (GLUE, CoNLL, your files) share: a head with `label_names` (None: regression)."""

    name: str
    label_names: tuple[str, ...] | None
    auto_class: type

    @property
    def num_labels(self) -> int:
        return 1 if self.label_names is None else len(self.label_names)

    def head_kwargs(self) -> dict[str, Any]:
        if self.label_names is None:
            return {"num_labels": 1, "problem_type": "regression"}
        return {"num_labels": self.num_labels, "id2label": dict(enumerate(self.label_names)),
                "label2id": {n: i for i, n in enumerate(self.label_names)}}

    def sequence_length(self, data_args: DataArguments) -> int:
        return data_args.max_seq_length

    @staticmethod
    def add_metrics(metrics: dict[str, float]) -> dict[str, float]:
        return metrics

    def check_head(self, config: Any, folder: Path) -> None:
        """Refuse a saved model whose head is not this task's kind."""
        arch = (config.architectures or [""])[0]
        wanted = self.auto_class.__name__.replace("AutoModel", "")
        if arch and not arch.endswith(wanted):
            raise ValueError(f"{folder} holds a {arch}, but {self.name} needs a *{wanted} model")
