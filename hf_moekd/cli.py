"""`hf-moekd` command line."""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .recipes import run
from .utils.flags import add_renamed_flags, dataclass_values


def _demo(ns: argparse.Namespace) -> None:
    from .studies.demo import run_demo

    run_demo(output_dir=ns.output_dir, seeds=tuple(ns.seeds), epochs=ns.epochs, kd_epochs=ns.kd_epochs)


def _distill_arguments() -> tuple[type, ...]:
    from .distillation import DistillationArguments
    from .recipes import ModelArguments
    from .recipes.arguments import DataArguments, ReportArguments, TaskArguments

    return TaskArguments, ModelArguments, DataArguments, ReportArguments, DistillationArguments


TRAINING_GROUP = "training (transformers.TrainingArguments)"
# TrainingArguments flags `--help` shows; every other one is accepted too and listed by `--help_all`
SHOWN_TRAINING_FLAGS = ("output_dir", "num_train_epochs", "max_steps", "learning_rate", "per_device_train_batch_size",
                        "per_device_eval_batch_size", "gradient_accumulation_steps", "seed", "report_to",
                        "logging_steps", "deepspeed", "push_to_hub")


class _HelpAll(argparse.Action):
    """`--help_all`: the help with every TrainingArguments flag shown, then exit."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        for action, text in parser.hidden_help.items():
            action.help = text
        parser.print_help()
        parser.exit()


def _group_training_flags(flags: argparse.ArgumentParser) -> dict[argparse.Action, str]:
    """Move the flags DistillationArguments inherits from TrainingArguments into their own group, listed last, all
    but `SHOWN_TRAINING_FLAGS` hidden from `--help` (`--help_all` shows them); returns each hidden action's help."""
    from dataclasses import fields

    from transformers import TrainingArguments

    inherited = {f.name for f in fields(TrainingArguments)}
    training = flags.add_argument_group(TRAINING_GROUP, "The most used ones; every TrainingArguments flag is "
                                        "accepted, `hf-moekd distill --help_all` lists them all.")
    hidden = {}
    for group in flags._action_groups:
        if group is training:
            continue
        for action in [a for a in group._group_actions if a.dest in inherited]:
            group._group_actions.remove(action)
            training._group_actions.append(action)
            if action.dest not in SHOWN_TRAINING_FLAGS:
                hidden[action], action.help = action.help, argparse.SUPPRESS
    return hidden


def add_distill_parser(sub: Any) -> argparse.ArgumentParser:
    """`hf-moekd distill`: the task recipe (hf_moekd.recipes.text.run_task): our dataclasses' flags first, then
    every TrainingArguments flag (hidden from --help, listed by --help_all)."""
    from transformers import HfArgumentParser

    from .recipes.arguments import TASK_NAMES

    flags = HfArgumentParser(_distill_arguments(), add_help=False)
    hidden = _group_training_flags(flags)
    p = sub.add_parser(
        "distill", parents=[flags], help=f"Fine-tune or distil a student on a task ({', '.join(TASK_NAMES)}); prints "
                                         "a summary table.",
        description="Fine-tune (no teacher) or distil a student on --task, save it with its model card and "
                    "all_results.json in --output_dir, evaluate it and print a summary table. Your own data: "
                    "--train_file / --validation_file or --dataset_name (text-classification, ner, clm, seq2seq, "
                    "image-classification). Every TrainingArguments flag is accepted too (--num_train_epochs, "
                    "--learning_rate, --report_to tensorboard, --deepspeed, ...), as in examples/run_glue.py.",
        epilog="example: hf-moekd distill --task sst2 --data_dir ../shared/data --output_dir out/student "
               "--teacher_model_name_or_path out/teacher --student_layers 0,2,4 --log_csv true --plot true")
    p.add_argument("--help_all", action=_HelpAll, help="show this help with every TrainingArguments flag and exit")
    p.hidden_help = hidden  # the parent's actions are shared with this parser
    p.set_defaults(func=_distill, parser=flags)
    return p


def _distill(ns: argparse.Namespace) -> None:
    from .recipes.text import run_task

    task, model_args, data_args, report, args = ns.parser.parse_dict(dataclass_values(ns))
    run_task(task.task, model_args, data_args, args, report)


@dataclass
class EvaluateArguments:
    """`hf-moekd evaluate`'s own flags (the data ones are `DataArguments`, as in distill)."""

    split: str | None = field(default=None, metadata={"help": "The split scored (default: validation for GLUE, the "
                                                               "dev set; test for CoNLL-2003).",
                                                       "choices": ["validation", "test"]})
    batch_size: int = field(default=32, metadata={"help": "Evaluation batch size."})
    output_file: str | None = field(default=None, metadata={"help": "Also write the metrics as JSON to this file."})
    plot_routing: str | None = field(default=None, metadata={"metavar": "PNG", "help": "MoE models: save a histogram "
                                                             "of tokens per expert per layer on the split."})
    allow_pickle_checkpoints: bool = field(default=False, metadata={"help": "Accept a folder with only pickle weights "
                                                                    "(pytorch_model.bin); only for files you trust."})


def add_evaluate_parser(sub: Any) -> argparse.ArgumentParser:
    """`hf-moekd evaluate MODEL_DIR --task TASK`: metrics of a saved model with the local metrics."""
    from transformers import HfArgumentParser

    from .recipes.arguments import TASK_NAMES, DataArguments, TaskArguments

    flags = HfArgumentParser((TaskArguments, DataArguments, EvaluateArguments), add_help=False)
    p = sub.add_parser(
        "evaluate", parents=[flags],
        help=f"Evaluate a saved model folder on a task ({', '.join(TASK_NAMES)}) as a distill run's final "
             "evaluation does; prints a summary table.",
        description="Score a saved sequence / token classifier with the local metrics (hf_moekd.metrics), or a causal "
                    "LM by loss and perplexity, computed as a distill run's final evaluation is. The data flags are "
                    "distill's (DataArguments).")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a saved model folder (config.json, weights, tokenizer)")
    add_renamed_flags(p, {"--allow_pickle": "--allow_pickle_checkpoints"})
    p.set_defaults(func=_evaluate, parser=flags)
    return p


def _evaluate(ns: argparse.Namespace) -> None:
    from .analysis import has_experts, plot_routing, routing_counts
    from .model_utils import count_parameters
    from .recipes.tasks import get_task
    from .recipes.text import evaluate_model, load_for_task, metric_items
    from .utils.outputs import markdown_table

    start = time.perf_counter()
    task_args, data_args, args = ns.parser.parse_dict(dataclass_values(ns, "model_dir"))
    task = get_task(task_args.task)
    model, tokenizer = load_for_task(ns.model_dir, task, args.allow_pickle_checkpoints)
    if args.plot_routing and not has_experts(model):
        raise ValueError(f"{ns.model_dir} has no MoE experts: --plot_routing needs an MoE model")
    metrics, data = evaluate_model(model, tokenizer, task, data_args, args.split, args.batch_size)
    split = args.split or task.eval_splits[-1]
    info = {"model_dir": str(ns.model_dir), "task": task.name, "split": split, "examples": len(data),
            "parameters": count_parameters(model)}
    if args.plot_routing:
        counts = routing_counts(model, data, batch_size=args.batch_size, collate_fn=task.collator(tokenizer))
        info["routing_plot"] = str(plot_routing(counts, args.plot_routing, title=f"tokens per expert ({task.name} {split})"))
    rows = [[k, f"{v:.4f}"] for k, v in metric_items(metrics).items()]
    rows += [["examples", f"{info['examples']:,}"], ["parameters", f"{info['parameters']:,}"],
             ["time (s)", f"{time.perf_counter() - start:.1f}"]]
    print(f"\n{task.name} {split}: {ns.model_dir}\n{markdown_table(['', 'value'], rows)}")
    if "routing_plot" in info:
        print(f"routing histogram written to {info['routing_plot']}")
    if args.output_file:
        Path(args.output_file).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_file).write_text(json.dumps({**info, "metrics": metrics}, indent=2) + "\n")
        print(f"metrics written to {args.output_file}")


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
