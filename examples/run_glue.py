#!/usr/bin/env python
"""Fine-tune a teacher or distil a student on a GLUE task (SST-2, CoLA, MRPC, RTE, STS-B).

Fine-tune all-MiniLM-L6-v2 on SST-2 from the local GLUE files:

    python examples/run_glue.py --task_name sst2 --data_dir ../shared/data/glue --output_dir out/teacher

Distil it into a 3-layer student made of teacher blocks 0, 2, 4 (logits + hidden-state KD):

    python examples/run_glue.py --task_name sst2 --data_dir ../shared/data/glue --output_dir out/student \
        --student_layers 0,2,4 --teacher_model_name_or_path out/teacher --hidden_loss_weight 1.0

Works with `accelerate launch` / `torchrun`. Without --data_dir the Hub's `nyu-mll/glue` is used.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, HfArgumentParser, set_seed

from hf_moekd.data import get_glue_task, load_glue, training_subset
from hf_moekd.distillation import DistillationArguments, DistillationTrainer
from hf_moekd.metrics import glue_compute_metrics
from hf_moekd.recipes import (
    ModelArguments,
    build_model,
    check_output_dir,
    configure_losses,
    model_for_saving,
    removed_on_failure,
    resume_checkpoint,
    trainable_parameters,
    run,
    save_run,
)


@dataclass
class DataArguments:
    task_name: str = field(default="sst2", metadata={"help": "GLUE task: sst2, cola, mrpc, rte or stsb."})
    data_dir: str | None = field(
        default=None, metadata={"help": "Folder holding SST-2/, CoLA/, ... with the original TSVs; None: the Hub."}
    )
    max_seq_length: int = field(default=128, metadata={"help": "Longer inputs are truncated."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on a fixed random subset this large."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first N dev examples."})


def main() -> None:
    model_args, data_args, args = HfArgumentParser((ModelArguments, DataArguments, DistillationArguments)).parse_args_into_dataclasses()
    task = get_glue_task(data_args.task_name)
    mode = configure_losses(args)
    check_output_dir(args)
    with removed_on_failure(args.output_dir):
        raw = load_glue(task.name, data_args.data_dir)
        raw["train"] = training_subset(raw["train"], data_args.max_train_samples)
        if data_args.max_eval_samples:
            raw["validation"] = raw["validation"].select(range(min(data_args.max_eval_samples, len(raw["validation"]))))
        set_seed(args.seed)
        labels = {} if task.is_regression else {
            "id2label": dict(enumerate(task.label_names)), "label2id": {n: i for i, n in enumerate(task.label_names)}
        }
        model, tokenizer = build_model(model_args, AutoModelForSequenceClassification, args.allow_pickle_checkpoints, num_labels=task.num_labels, **labels)

        def tokenize(batch):
            texts = [batch["sentence1"]] + ([batch["sentence2"]] if "sentence2" in batch else [])
            return tokenizer(*texts, truncation=True, max_length=data_args.max_seq_length)

        data = raw.map(tokenize, batched=True, remove_columns=[c for c in raw["train"].column_names if c != "label"])
        trainer = DistillationTrainer(
            model=model, args=args, train_dataset=data["train"], eval_dataset=data["validation"],
            processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer),
            compute_metrics=glue_compute_metrics(task.name),
        )
    results: dict = {"mode": mode, "task": task.name, "trainable_params": trainable_parameters(trainer.model)}
    trained = args.do_train or not args.do_eval  # an evaluation-only run saves no model
    if trained:
        train_result = trainer.train(resume_from_checkpoint=resume_checkpoint(args))
        results.update(train_result.metrics)
        model_for_saving(trainer.model, model_args)
        trainer.save_model()
    results.update(trainer.evaluate())
    save_run(trainer, results, model_args, [task.name], model_saved=trained)
    if trainer.is_world_process_zero():
        print({k: v for k, v in results.items() if k.startswith("eval_")})


if __name__ == "__main__":
    run(main)
