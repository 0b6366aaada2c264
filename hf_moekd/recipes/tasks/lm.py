"""The language-model tasks of `hf-moekd distill` / `evaluate`: `--task clm` (texts from files, tokenized and grouped
into blocks as transformers' `run_clm.py` does) and `--task seq2seq` (source -> target pairs, as `run_summarization.py`
/ `run_translation.py`); both scored by loss and perplexity."""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from datasets import DatasetDict
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, DataCollatorForSeq2Seq, default_data_collator

from .base import cap_splits
from ..readers import data_sources, select_texts

if TYPE_CHECKING:
    from ..arguments import DataArguments

def group_texts(examples: dict[str, list], block_size: int) -> dict[str, list]:
    """Concatenate tokenized texts and cut them into blocks of `block_size` tokens (the remainder is dropped);
    labels are the input ids (the model shifts them)."""
    joined = {k: list(chain(*examples[k])) for k in examples}
    total = (len(joined["input_ids"]) // block_size) * block_size
    blocks = {k: [v[i:i + block_size] for i in range(0, total, block_size)] for k, v in joined.items()}
    blocks["labels"] = [list(block) for block in blocks["input_ids"]]
    return blocks


@dataclass(frozen=True)
class LanguageModelTask:
    """What the language-model tasks share: texts from `--train_file` / `--validation_file`, no label set, scored by
    the model's own loss and its perplexity."""

    name: str = "lm"
    label_names: tuple[str, ...] | None = None
    token_level: bool = True
    eval_splits: tuple[str, ...] = ("validation",)

    def head_kwargs(self) -> dict[str, Any]:
        return {}

    def sequence_length(self, data_args: DataArguments) -> int:
        return data_args.block_size or data_args.max_seq_length

    def columns(self, data_args: DataArguments) -> list[str]:
        raise NotImplementedError

    def load(self, data_args: DataArguments) -> DatasetDict:
        sources = data_sources(data_args, self.name, ("train", "validation"))
        raw = DatasetDict({split: select_texts(source.read(), self.columns(data_args), source.where)
                           for split, source in sources.items()})
        return cap_splits(raw, data_args, ("validation",))

    def compute_metrics(self) -> None:
        return None

    @staticmethod
    def add_metrics(metrics: dict[str, float]) -> dict[str, float]:
        """Perplexity next to every loss: exp(loss) of the mean next-token cross-entropy."""
        for key in [k for k in metrics if k.endswith("_loss") and k.split("_")[0] in ("eval", "test")]:
            metrics[key.replace("_loss", "_perplexity")] = math.exp(min(metrics[key], 50.0))
        return metrics


@dataclass(frozen=True)
class CausalLMTask(LanguageModelTask):
    """Next-token prediction on the user's texts (`--text_column`), in blocks of `--block_size` tokens."""

    name: str = "clm"

    @property
    def auto_class(self) -> type:
        return AutoModelForCausalLM

    def columns(self, data_args: DataArguments) -> list[str]:
        return [data_args.text_column]

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

    def check_config(self, config: Any, folder: Path) -> None:
        arch = (config.architectures or [""])[0]
        if arch and not arch.endswith(("ForCausalLM", "LMHeadModel")):
            raise ValueError(f"{folder} holds a {arch}, but clm needs a causal language model (*ForCausalLM)")


@dataclass(frozen=True)
class Seq2SeqTask(LanguageModelTask):
    """Source -> target generation (`--source_column`, `--target_column`), each truncated to `--max_seq_length`."""

    name: str = "seq2seq"

    @property
    def auto_class(self) -> type:
        return AutoModelForSeq2SeqLM

    def sequence_length(self, data_args: DataArguments) -> int:
        return data_args.max_seq_length

    def columns(self, data_args: DataArguments) -> list[str]:
        return [data_args.source_column, data_args.target_column]

    def tokenize(self, raw: DatasetDict, tokenizer: Any, max_length: int) -> DatasetDict:
        source, target = next(iter(raw.values())).column_names

        def encode(batch: dict) -> Any:
            return tokenizer(batch[source], text_target=batch[target], truncation=True, max_length=max_length)

        return raw.map(encode, batched=True, remove_columns=[source, target])

    def collator(self, tokenizer: Any) -> Callable:
        return DataCollatorForSeq2Seq(tokenizer)

    def check_config(self, config: Any, folder: Path) -> None:
        if not getattr(config, "is_encoder_decoder", False):
            raise ValueError(f"{folder} holds a {(config.architectures or ['?'])[0]}, but seq2seq needs an "
                             "encoder-decoder model (*ForConditionalGeneration)")
