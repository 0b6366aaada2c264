#!/usr/bin/env python
"""Fine-tune a teacher or distil a student on a GLUE task (SST-2, CoLA, MRPC, RTE, STS-B).

Fine-tune all-MiniLM-L6-v2 on SST-2 from the local GLUE files:

    python examples/run_glue.py --task_name sst2 --data_dir ../shared/data/glue --output_dir out/teacher

Distil it into a 3-layer student made of teacher blocks 0, 2, 4 (logits + hidden-state KD):

    python examples/run_glue.py --task_name sst2 --data_dir ../shared/data/glue --output_dir out/student \
        --student_layers 0,2,4 --teacher_model_name_or_path out/teacher --hidden_loss_weight 1.0

Works with `accelerate launch` / `torchrun`. Without --data_dir the Hub's `nyu-mll/glue` is used.
The recipe is hf_moekd.recipes.text.run_task, also run by `hf-moekd distill --task sst2 ...`.
"""
from __future__ import annotations

from transformers import HfArgumentParser

from hf_moekd.distillation import DistillationArguments
from hf_moekd.recipes import ModelArguments, run
from hf_moekd.recipes.arguments import GlueDataArguments, ReportArguments
from hf_moekd.recipes.text import run_task


def main() -> None:
    parser = HfArgumentParser((ModelArguments, GlueDataArguments, ReportArguments, DistillationArguments))
    model_args, data_args, report, args = parser.parse_args_into_dataclasses()
    run_task(data_args.task_name, model_args, data_args, args, report)


if __name__ == "__main__":
    run(main)
