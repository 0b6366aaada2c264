"""`hf-moekd` command line."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from .recipes import run


def _demo(ns: argparse.Namespace) -> None:
    from .studies.demo import run_demo

    run_demo(output_dir=ns.output_dir, seeds=tuple(ns.seeds), epochs=ns.epochs, kd_epochs=ns.kd_epochs)


def _distill_arguments() -> tuple[type, ...]:
    from .distillation import DistillationArguments
    from .recipes import ModelArguments
    from .recipes.arguments import DataArguments, ReportArguments, TaskArguments

    return TaskArguments, ModelArguments, DataArguments, ReportArguments, DistillationArguments


def add_distill_parser(sub: Any) -> argparse.ArgumentParser:
    """`hf-moekd distill`: the task recipe (hf_moekd.recipes.text.run_task) with every DistillationArguments flag."""
    from transformers import HfArgumentParser

    flags = HfArgumentParser(_distill_arguments(), add_help=False)
    p = sub.add_parser(
        "distill", parents=[flags], help="Fine-tune or distil a student on a GLUE task, CoNLL-2003 NER or your "
                                         "texts (--task clm); prints a summary table.",
        description="Fine-tune (no teacher) or distil a student on --task, save it with its model card and "
                    "all_results.json in --output_dir, evaluate it (CoNLL: validation and test) and print a summary "
                    "table. Takes every TrainingArguments / DistillationArguments flag (--report_to tensorboard, "
                    "--num_train_epochs, --alpha, ...), as examples/run_glue.py and run_conll.py do.",
        epilog="example: hf-moekd distill --task sst2 --data_dir ../shared/data --output_dir out/student "
               "--teacher_model_name_or_path out/teacher --student_layers 0,2,4 --log_csv true --plot true")
    p.set_defaults(func=_distill, parser=flags)
    return p


def _distill(ns: argparse.Namespace) -> None:
    from .recipes.text import run_task

    values = {k: v for k, v in vars(ns).items() if k not in ("command", "func", "parser")}
    task, model_args, data_args, report, args = ns.parser.parse_dict(values)
    run_task(task.task, model_args, data_args, args, report)


def add_evaluate_parser(sub: Any) -> argparse.ArgumentParser:
    """`hf-moekd evaluate MODEL_DIR --task TASK`: metrics of a saved model with the local metrics."""
    from .recipes.arguments import TASK_NAMES

    p = sub.add_parser(
        "evaluate", help="Evaluate a saved model folder on a GLUE dev set, CoNLL-2003 test or held-out text (clm: "
                         "loss and perplexity); prints a summary table.",
        description="Score a saved sequence / token classifier with the local metrics (hf_moekd.metrics), or a causal "
                    "LM by loss and perplexity, computed as a distill run's final evaluation is.")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a saved model folder (config.json, weights, tokenizer)")
    p.add_argument("--task", required=True, help=f"the task the model was trained for: {', '.join(TASK_NAMES)}")
    p.add_argument("--data_dir", default=None,
                   help="GLUE: folder holding SST-2/, ...; CoNLL: folder holding test.txt; a folder holding glue/ and "
                        "conll2003/ works for both (default: the Hub)")
    p.add_argument("--split", default=None, choices=["validation", "test"],
                   help="default: validation (GLUE dev set), test (CoNLL-2003)")
    p.add_argument("--max_eval_samples", type=int, default=None, help="the first N examples of the split")
    p.add_argument("--max_seq_length", type=int, default=128, help="as in training (default: 128)")
    p.add_argument("--validation_file", default=None,
                   help="clm / seq2seq: held-out texts (.txt, .json, .jsonl, .csv, .tsv, .parquet, datasets folder)")
    p.add_argument("--dataset_name", default=None,
                   help="instead of --validation_file: a Hub dataset or a local folder (its validation split)")
    p.add_argument("--dataset_config_name", default=None, help="the configuration of --dataset_name")
    p.add_argument("--text_column", default="text", help="clm: the column holding the texts (default: text)")
    p.add_argument("--source_column", default="source", help="seq2seq: the input column (default: source)")
    p.add_argument("--text_column_names", default=None, help="text-classification: the text column(s), 'a' or 'a,b'")
    p.add_argument("--label_column_name", default="label", help="text-classification: the label column")
    p.add_argument("--image_column_name", default="image", help="image-classification: the image column")
    p.add_argument("--tokens_column_name", default="tokens", help="ner, json files: the tokens column")
    p.add_argument("--tags_column_name", default="tags", help="ner, json files: the tags column")
    p.add_argument("--target_column", default="target", help="seq2seq: the output column (default: target)")
    p.add_argument("--block_size", type=int, default=None, help="clm: tokens per block (default: --max_seq_length)")
    p.add_argument("--batch_size", type=int, default=32, help="evaluation batch size (default: 32)")
    p.add_argument("--output_file", default=None, help="also write the metrics as JSON to this file")
    p.add_argument("--plot_routing", metavar="PNG", default=None,
                   help="MoE models: save a histogram of tokens per expert per layer on the split")
    p.add_argument("--allow_pickle", action="store_true",
                   help="accept a folder with only pickle weights (pytorch_model.bin); only for files you trust")
    p.set_defaults(func=_evaluate)
    return p


def _evaluate(ns: argparse.Namespace) -> None:
    from .analysis import has_experts, plot_routing, routing_counts
    from .model_utils import count_parameters
    from .recipes.arguments import DataArguments
    from .recipes.tasks import get_task
    from .recipes.text import evaluate_model, load_for_task, metric_items
    from .utils.outputs import markdown_table

    start = time.perf_counter()
    task = get_task(ns.task)
    model, tokenizer = load_for_task(ns.model_dir, task, ns.allow_pickle)
    if ns.plot_routing and not has_experts(model):
        raise ValueError(f"{ns.model_dir} has no MoE experts: --plot_routing needs an MoE model")
    data_args = DataArguments(data_dir=ns.data_dir, max_seq_length=ns.max_seq_length, max_eval_samples=ns.max_eval_samples,
                              validation_file=ns.validation_file, dataset_name=ns.dataset_name,
                              dataset_config_name=ns.dataset_config_name, text_column=ns.text_column, block_size=ns.block_size,
                              source_column=ns.source_column, target_column=ns.target_column,
                              text_column_names=ns.text_column_names, label_column_name=ns.label_column_name,
                              tokens_column_name=ns.tokens_column_name, tags_column_name=ns.tags_column_name,
                              image_column_name=ns.image_column_name)
    metrics, data = evaluate_model(model, tokenizer, task, data_args, ns.split, ns.batch_size)
    split = ns.split or task.eval_splits[-1]
    info = {"model_dir": str(ns.model_dir), "task": task.name, "split": split, "examples": len(data),
            "parameters": count_parameters(model)}
    if ns.plot_routing:
        counts = routing_counts(model, data, batch_size=ns.batch_size, collate_fn=task.collator(tokenizer))
        info["routing_plot"] = str(plot_routing(counts, ns.plot_routing, title=f"tokens per expert ({task.name} {split})"))
    rows = [[k, f"{v:.4f}"] for k, v in metric_items(metrics).items()]
    rows += [["examples", f"{info['examples']:,}"], ["parameters", f"{info['parameters']:,}"],
             ["time (s)", f"{time.perf_counter() - start:.1f}"]]
    print(f"\n{task.name} {split}: {ns.model_dir}\n{markdown_table(['', 'value'], rows)}")
    if "routing_plot" in info:
        print(f"routing histogram written to {info['routing_plot']}")
    if ns.output_file:
        Path(ns.output_file).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.output_file).write_text(json.dumps({**info, "metrics": metrics}, indent=2) + "\n")
        print(f"metrics written to {ns.output_file}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-moekd", description="Knowledge distillation between MoE and dense models.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="OneS on scikit-learn digits: V-MoE -> gathered dense model -> KD; prints a "
                                       "results table (no arguments needed).")
    demo.add_argument("--output_dir", default="outputs/demo", help="where the OneS model is saved (replaced)")
    demo.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (each trains every model)")
    demo.add_argument("--epochs", type=float, default=20, help="training epochs of the dense baseline and the V-MoE")
    demo.add_argument("--kd_epochs", type=float, default=10, help="distillation epochs of the gathered model")
    demo.set_defaults(func=_demo)
    from .cards.cli import add_card_parser
    from .ones.cli import add_gather_parser

    add_distill_parser(sub)
    add_evaluate_parser(sub)
    add_gather_parser(sub)
    add_card_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    ns = build_parser().parse_args(argv)
    run(lambda: ns.func(ns))


if __name__ == "__main__":
    main()
