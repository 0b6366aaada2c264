"""The causal-LM task of `hf-moekd distill` / `evaluate` (`--task clm`): texts from files, tokenized and grouped into
blocks as transformers' `run_clm.py` does; scored by loss and perplexity."""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk
from transformers import AutoModelForCausalLM, default_data_collator

from ..data import training_subset

if TYPE_CHECKING:
    from .text import DataArguments

TEXT_SUFFIXES = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json"}


def read_texts(path: str | Path, column: str, role: str) -> Dataset:
    """One split of texts: a .txt file (a text per line), .json/.jsonl (records with `column`) or a saved `datasets`
    folder; one clear error for a missing file, an unknown format, a missing column or an empty file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--{role} {path} does not exist")
    if path.is_dir():
        data = load_from_disk(str(path))
        if isinstance(data, DatasetDict):
            raise ValueError(f"--{role} {path} is a DatasetDict folder; point at one split's folder (e.g. {path}/train)")
    elif path.suffix in TEXT_SUFFIXES:
        data = load_dataset(TEXT_SUFFIXES[path.suffix], data_files=str(path), split="train")
    else:
        raise ValueError(f"--{role} {path}: unknown file type {path.suffix!r}; use .txt (a text per line), .json, "
                         ".jsonl or a datasets folder")
    if column not in data.column_names:
        raise ValueError(f"--{role} {path} has no column {column!r} (columns: {', '.join(data.column_names)}); "
                         "pass --text_column")
    data = data.filter(lambda row: bool(row[column] and row[column].strip()))
    if len(data) == 0:
        raise ValueError(f"--{role} {path} holds no text")
    return data.select_columns([column])


def group_texts(examples: dict[str, list], block_size: int) -> dict[str, list]:
    """Concatenate tokenized texts and cut them into blocks of `block_size` tokens (the remainder is dropped);
    labels are the input ids (the model shifts them)."""
    joined = {k: list(chain(*examples[k])) for k in examples}
    total = (len(joined["input_ids"]) // block_size) * block_size
    blocks = {k: [v[i:i + block_size] for i in range(0, total, block_size)] for k, v in joined.items()}
    blocks["labels"] = [list(block) for block in blocks["input_ids"]]
    return blocks


@dataclass(frozen=True)
class CausalLMTask:
    """Next-token prediction on the user's texts (`--train_file`, `--validation_file`)."""

    name: str = "clm"
    label_names: tuple[str, ...] | None = None
    token_level: bool = True
    eval_splits: tuple[str, ...] = ("validation",)

    @property
    def auto_class(self) -> type:
        return AutoModelForCausalLM

    def head_kwargs(self) -> dict[str, Any]:
        return {}

    def sequence_length(self, data_args: DataArguments) -> int:
        return data_args.block_size or data_args.max_seq_length

    def load(self, data_args: DataArguments) -> DatasetDict:
        files = {"train": data_args.train_file, "validation": data_args.validation_file}
        if not files["validation"]:
            raise ValueError("--task clm needs --validation_file (held-out text for loss and perplexity)")
        raw = DatasetDict({split: read_texts(path, data_args.text_column, f"{split}_file")
                           for split, path in files.items() if path})
        if "train" in raw:
            raw["train"] = training_subset(raw["train"], data_args.max_train_samples)
        if data_args.max_eval_samples:
            raw["validation"] = raw["validation"].select(range(min(data_args.max_eval_samples, len(raw["validation"]))))
        return raw

    def tokenize(self, raw: DatasetDict, tokenizer: Any, block_size: int) -> DatasetDict:
        column = next(iter(raw.values())).column_names[0]
        tokenized = raw.map(lambda batch: tokenizer(batch[column]), batched=True, remove_columns=[column])
        grouped = tokenized.map(lambda batch: group_texts(batch, block_size), batched=True)
        for split, data in grouped.items():
            if len(data) == 0:
                raise ValueError(f"the {split} texts hold fewer than --block_size {block_size} tokens: pass a smaller "
                                 "--block_size or more text")
        return grouped

    def collator(self, tokenizer: Any) -> Callable:
        return default_data_collator

    def compute_metrics(self) -> None:
        return None

    def check_config(self, config: Any, folder: Path) -> None:
        arch = (config.architectures or [""])[0]
        if arch and not arch.endswith(("ForCausalLM", "LMHeadModel")):
            raise ValueError(f"{folder} holds a {arch}, but clm needs a causal language model (*ForCausalLM)")

    @staticmethod
    def add_metrics(metrics: dict[str, float]) -> dict[str, float]:
        """Perplexity next to every loss: exp(loss) of the mean next-token cross-entropy."""
        for key in [k for k in metrics if k.endswith("_loss") and k.split("_")[0] in ("eval", "test")]:
            metrics[key.replace("_loss", "_perplexity")] = math.exp(min(metrics[key], 50.0))
        return metrics
