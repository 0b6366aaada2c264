#!/usr/bin/env python
"""Fine-tune a teacher or distil a student on CoNLL-2003 NER (entity F1 with seqeval).

    python examples/run_conll.py --data_dir ../shared/data/conll2003 --output_dir out/ner-teacher
    python examples/run_conll.py --data_dir ../shared/data/conll2003 --output_dir out/ner-student \
        --student_layers 0,2,4 --teacher_model_name_or_path out/ner-teacher

Word pieces: the first piece of each word carries the word's tag, the other pieces get -100 and are
ignored by the loss, token-level KD and the metric. Reports validation and test F1.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from transformers import AutoModelForTokenClassification, DataCollatorForTokenClassification, HfArgumentParser, set_seed

from hf_moekd.data import CONLL_LABELS, load_conll, training_subset
from hf_moekd.distillation import DistillationArguments, DistillationTrainer
from hf_moekd.metrics import conll_compute_metrics
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
    data_dir: str | None = field(
        default=None, metadata={"help": "Folder holding train.txt, valid.txt, test.txt (token<TAB>tag); None: the Hub."}
    )
    max_seq_length: int = field(default=128, metadata={"help": "Longer inputs (in word pieces) are truncated."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on a fixed random subset this large."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first N sentences of each split."})


def align_labels(word_ids: list[int | None], tags: list[int]) -> list[int]:
    """Tag of each word on its first word piece, -100 on special tokens and continuation pieces."""
    labels, previous = [], None
    for word in word_ids:
        labels.append(-100 if word is None or word == previous else tags[word])
        previous = word
    return labels


def main() -> None:
    model_args, data_args, args = HfArgumentParser((ModelArguments, DataArguments, DistillationArguments)).parse_args_into_dataclasses()
    mode = configure_losses(args)
    check_output_dir(args)
    with removed_on_failure(args.output_dir):
        raw = load_conll(data_args.data_dir)
        raw["train"] = training_subset(raw["train"], data_args.max_train_samples)
        if data_args.max_eval_samples:
            for split in ("validation", "test"):
                raw[split] = raw[split].select(range(min(data_args.max_eval_samples, len(raw[split]))))
        set_seed(args.seed)
        label_names = list(CONLL_LABELS)
        model, tokenizer = build_model(
            model_args, AutoModelForTokenClassification, args.allow_pickle_checkpoints, num_labels=len(label_names),
            id2label=dict(enumerate(label_names)), label2id={n: i for i, n in enumerate(label_names)},
        )

        def tokenize(batch):
            enc = tokenizer(batch["tokens"], is_split_into_words=True, truncation=True, max_length=data_args.max_seq_length)
            enc["labels"] = [align_labels(enc.word_ids(i), tags) for i, tags in enumerate(batch["ner_tags"])]
            return enc

        data = raw.map(tokenize, batched=True, remove_columns=raw["train"].column_names)
        trainer = DistillationTrainer(
            model=model, args=args, train_dataset=data["train"], eval_dataset=data["validation"],
            processing_class=tokenizer, data_collator=DataCollatorForTokenClassification(tokenizer),
            compute_metrics=conll_compute_metrics(label_names),
        )
    results: dict = {"mode": mode, "task": "conll2003", "trainable_params": trainable_parameters(trainer.model)}
    trained = args.do_train or not args.do_eval  # an evaluation-only run saves no model
    if trained:
        results.update(trainer.train(resume_from_checkpoint=resume_checkpoint(args)).metrics)
        model_for_saving(trainer.model, model_args)
        trainer.save_model()
    results.update(trainer.evaluate())
    results.update(trainer.evaluate(data["test"], metric_key_prefix="test"))
    save_run(trainer, results, model_args, ["conll2003"], model_saved=trained)
    if trainer.is_world_process_zero():
        print({k: v for k, v in results.items() if k.startswith(("eval_", "test_"))})


if __name__ == "__main__":
    run(main)
