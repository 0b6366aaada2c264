#!/usr/bin/env python
"""Fine-tune a teacher or distil a student on CoNLL-2003 NER (entity F1 with seqeval).

    python examples/run_conll.py --data_dir ../shared/data/conll2003 --output_dir out/ner-teacher
    python examples/run_conll.py --data_dir ../shared/data/conll2003 --output_dir out/ner-student \
        --student_layers 0,2,4 --teacher_model_name_or_path out/ner-teacher

Word pieces: the first piece of each word carries the word's tag, the other pieces get -100 and are
ignored by the loss, token-level KD and the metric. Reports validation and test F1.
The recipe is hf_moekd.recipes.text.run_task, also run by `hf-moekd distill --task conll ...`.
"""
from __future__ import annotations

from transformers import HfArgumentParser

from hf_moekd.distillation import DistillationArguments
from hf_moekd.recipes import ModelArguments, run
from hf_moekd.recipes.arguments import DataArguments, ReportArguments
from hf_moekd.recipes.text import run_task


def main() -> None:
    parser = HfArgumentParser((ModelArguments, DataArguments, ReportArguments, DistillationArguments))
    model_args, data_args, report, args = parser.parse_args_into_dataclasses()
    run_task("conll", model_args, data_args, args, report)


if __name__ == "__main__":
    run(main)
