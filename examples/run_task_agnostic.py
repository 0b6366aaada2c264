#!/usr/bin/env python
"""Task-agnostic distillation (stage 1 of MiniLMv2 / MiniMoE): a student learns the teacher's last-layer
self-attention relations (Q-Q, K-K, V-V; 32 relation heads) on unlabelled text, no labels and no logits.

The corpus is every sentence of the GLUE train files and CoNLL-2003 train (deduplicated); stage 2 is
examples/run_glue.py / run_conll.py with `--model_name_or_path` set to this script's output.

    # dense 3-layer student (random init, MiniLM width) and its MiniMoE twin (4 top-1 FFN experts, same FLOPs/token)
    python examples/run_task_agnostic.py --data_dir ../shared/data --output_dir out/stage1-dense \\
        --student_config_overrides num_hidden_layers=3 --num_train_epochs 1
    python examples/run_task_agnostic.py --data_dir ../shared/data --output_dir out/stage1-minimoe \\
        --student_config_overrides num_hidden_layers=3 --moe_experts 4 --num_train_epochs 1

Resumable: with `--save_strategy steps --save_steps N`, rerun the same command with
`--resume_from_checkpoint last` after an interruption. The teacher defaults to all-MiniLM-L6-v2 (`minilm-l6`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from transformers import AutoModel, DataCollatorWithPadding, HfArgumentParser, set_seed

from hf_moekd.data.text import CORPUS_SOURCES, load_text_corpus, training_subset
from hf_moekd.distillation import DistillationArguments, DistillationTrainer
from hf_moekd.model_utils import count_parameters
from hf_moekd.recipes import (
    ModelArguments,
    build_model,
    check_output_dir,
    configure_losses,
    model_for_saving,
    removed_on_failure,
    resume_checkpoint,
    run,
    save_run,
)
from hf_moekd.utils.teachers import MINILM


@dataclass
class CorpusArguments:
    data_dir: str | None = field(
        default=None, metadata={"help": "Folder holding glue/ and conll2003/ (original files); None: the Hub copies."}
    )
    corpus_sources: list[str] = field(
        default_factory=lambda: list(CORPUS_SOURCES),
        metadata={"help": f"Train splits whose sentences form the corpus: any of {', '.join(CORPUS_SOURCES)}."},
    )
    max_seq_length: int = field(default=64, metadata={"help": "Longer sentences are truncated."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use a fixed random subset of the corpus."})


def main() -> None:
    parser = HfArgumentParser((ModelArguments, CorpusArguments, DistillationArguments))
    parser.set_defaults(teacher_model_name_or_path=MINILM, task_agnostic=True, attention_relation_weight=1.0)
    model_args, corpus_args, args = parser.parse_args_into_dataclasses()
    if not args.task_agnostic:
        raise ValueError("This script trains without labels: keep --task_agnostic true (use run_glue.py for tasks).")
    run_kind, args = configure_losses(args)
    check_output_dir(args)
    with removed_on_failure(args.output_dir):
        corpus = load_text_corpus(corpus_args.data_dir, corpus_args.corpus_sources)
        corpus = training_subset(corpus, corpus_args.max_train_samples)
        set_seed(args.seed)
        model, tokenizer = build_model(model_args, AutoModel, args.allow_pickle_checkpoints)
        data = corpus.map(lambda b: tokenizer(b["text"], truncation=True, max_length=corpus_args.max_seq_length),
                          batched=True, remove_columns=["text"])
        trainer = DistillationTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                                      data_collator=DataCollatorWithPadding(tokenizer))
    results = {"run_kind": f"task-agnostic {run_kind}", "corpus_sentences": len(corpus),
               "trainable_params": count_parameters(trainer.model, trainable_only=True)}
    results.update(trainer.train(resume_from_checkpoint=resume_checkpoint(args)).metrics)
    model_for_saving(trainer.model, model_args)
    trainer.save_model()
    save_run(trainer, results, model_args, list(corpus_args.corpus_sources))
    if trainer.is_world_process_zero():
        print({k: v for k, v in results.items() if k.startswith(("train_", "corpus"))})


if __name__ == "__main__":
    run(main)
