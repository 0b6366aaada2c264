"""The task recipe: fine-tune or distil a student on any task of `recipes.tasks`, and evaluate saved models.

One code path for `hf-moekd distill`, `hf-moekd evaluate`, examples/run_glue.py and examples/run_conll.py.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from datasets import DatasetDict
from transformers import PreTrainedModel, set_seed

from ..analysis import has_experts, routing_counts
from ..distillation import DistillationArguments, DistillationTrainer
from ..distillation.engines import is_zero3
from ..model_utils.parameters import count_parameters
from .arguments import DataArguments, ModelArguments, ReportArguments
from .common import check_output_dir, configure_losses, removed_on_failure, resume_checkpoint, save_run
from .students import build_model, model_for_saving
from .tasks import Task, get_task
from ..utils.callbacks import CSVLoggerCallback
from ..utils.outputs import NOT_METRIC_SUFFIXES, check_weights, markdown_table
from ..utils.plots import plot_loss_terms, plot_routing


# ---- distillation ------------------------------------------------------------------------------------
def run_task(task_name: str, model_args: ModelArguments, data_args: DataArguments, args: DistillationArguments,
             report: ReportArguments | None = None) -> dict[str, Any]:
    """Fine-tune (no teacher) or distil the student on the task, save it with its card, evaluate it on the
    evaluation splits, print a summary table; returns what all_results.json holds."""
    start = time.perf_counter()
    report = report or ReportArguments()
    task = get_task(task_name)
    run_kind, args = configure_losses(args)
    check_output_dir(args)
    _check_report_to(args)
    with removed_on_failure(args.output_dir):
        raw = task.load(data_args)
        set_seed(args.seed)
        model, tokenizer = build_model(model_args, task.auto_class, args.allow_pickle_checkpoints,
                                       getattr(task, "load_processor", None), **task.head_kwargs())
        data = task.tokenize(raw, tokenizer, task.sequence_length(data_args))
        callbacks = []
        if report.log_csv:
            callbacks.append(CSVLoggerCallback())
        trainer = DistillationTrainer(
            model=model, args=args, train_dataset=data["train"], eval_dataset=data["validation"],
            processing_class=tokenizer, data_collator=task.collator(tokenizer), compute_metrics=task.compute_metrics(),
            callbacks=callbacks,
        )
        if hasattr(task, "check_teacher"):  # images: the teacher must take the student's pixel_values
            task.check_teacher(model.config, getattr(trainer.teacher, "config", None))
    results: dict[str, Any] = {"run_kind": run_kind, "task": task.name,
                               "trainable_params": count_parameters(trainer.model, trainable_only=True)}
    trained = args.do_train or not args.do_eval  # an evaluation-only run saves no model
    if trained:
        results.update(trainer.train(resume_from_checkpoint=resume_checkpoint(args)).metrics)
        model_for_saving(trainer.model, model_args)
        trainer.save_model()
    results.update(task.add_metrics(trainer.evaluate()))
    for split in task.eval_splits[1:]:
        results.update(task.add_metrics(trainer.evaluate(data[split], metric_key_prefix=split)))
    save_run(trainer, results, model_args, [task.name], model_saved=trained)
    if trainer.is_world_process_zero():
        if report.plot:
            _save_plots(trainer, data["validation"], task)
        print(distill_summary(results, trainer, time.perf_counter() - start))
    return results


def _check_report_to(args: DistillationArguments) -> None:
    from transformers.integrations import is_tensorboard_available

    if "tensorboard" in (args.report_to or []) and not is_tensorboard_available():
        raise ValueError("--report_to tensorboard needs the tensorboard package: pip install 'hf_moekd[tensorboard]'.")


def _save_plots(trainer: DistillationTrainer, eval_data: Any, task: Task) -> None:
    """loss_terms.png, and routing_student.png / routing_teacher.png for MoE models, in output_dir (process 0 only)."""
    out = Path(trainer.args.output_dir)
    try:
        path = plot_loss_terms(trainer.state.log_history, out / "loss_terms.png", weights=trainer.loss_weights,
                               title=f"{task.name}: training loss terms")
        print(f"loss curves: {path}")
    except ValueError as err:  # nothing logged: too few steps for --logging_steps
        print(f"no loss_terms.png: {err}")
    if is_zero3(trainer.accelerator):  # partitioned weights: a forward on process 0 alone would hang
        print("no routing plots under DeepSpeed ZeRO-3 (partitioned weights): for an MoE student, run "
              f"hf-moekd evaluate {out} --task {task.name} --plot_routing routing.png")
        return
    for role, model in (("student", trainer.model), ("teacher", trainer.teacher)):
        if model is None or not has_experts(model):
            continue
        try:
            counts = routing_counts(model, eval_data, batch_size=trainer.args.per_device_eval_batch_size,
                                    collate_fn=trainer.data_collator)
        except ValueError as err:  # e.g. a teacher offloaded with teacher_device_map (accelerate hooks its forward)
            print(f"no routing_{role}.png: {err}")
            continue
        path = plot_routing(counts, out / f"routing_{role}.png", title=f"{role}: tokens per expert ({task.name})")
        print(f"{role} routing: {path}")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def metric_items(results: dict[str, Any]) -> dict[str, Any]:
    """The evaluation metrics of `results` (eval_* / test_*, without speed figures)."""
    return {k: v for k, v in results.items()
            if k.startswith(("eval_", "test_")) and not k.endswith(NOT_METRIC_SUFFIXES)}


def distill_summary(results: dict[str, Any], trainer: DistillationTrainer, seconds: float) -> str:
    """Markdown table: each metric (teacher's too when its folder recorded it for this task), parameters, time."""
    teacher = trainer.args.teacher_model_name_or_path
    recorded = {}
    if teacher and (Path(teacher) / "all_results.json").is_file():
        recorded = json.loads((Path(teacher) / "all_results.json").read_text())
        recorded = recorded if recorded.get("task") == results.get("task") else {}
    rows = [[key, _fmt(value), _fmt(recorded.get(key, "-"))] for key, value in metric_items(results).items()]
    rows.append(["parameters", _fmt(count_parameters(trainer.model)),
                 _fmt(count_parameters(trainer.teacher)) if trainer.teacher else "-"])
    rows.append(["trainable parameters", _fmt(results["trainable_params"]), "-"])
    if "train_runtime" in results:
        rows.append(["training time (s)", f"{results['train_runtime']:.1f}", "-"])
    rows.append(["total time (s)", f"{seconds:.1f}", "-"])
    header = ["", "student"] + ([f"teacher{' (recorded)' if recorded else ''}"] if teacher else [])
    title = f"\n{results['task']} ({results['run_kind']}), saved to {trainer.args.output_dir}"
    return f"{title}\n{markdown_table(header, [row[:len(header)] for row in rows])}"


# ---- evaluation of a saved model ---------------------------------------------------------------------
def load_for_task(model_dir: str | Path, task: Task, allow_pickle: bool = False) -> tuple[PreTrainedModel, Any]:
    """A saved model folder and its processor (tokenizer, or the task's `load_processor`: images), checked against
    the task (head kind, label count, label names)."""
    from transformers import AutoConfig, AutoTokenizer

    folder = Path(model_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    if not (folder / "config.json").is_file() and (folder / "adapter_config.json").is_file():
        raise ValueError(f"{folder} holds a peft adapter, not a whole model: evaluate a run saved with "
                         "--merge_adapters true")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: pass a saved model folder (the output_dir of a run)")
    check_weights(folder, allow_pickle, "--allow_pickle_checkpoints")
    config = AutoConfig.from_pretrained(folder)
    task.check_config(config, folder)
    model = task.auto_class.from_pretrained(folder, use_safetensors=None if allow_pickle else True)
    load_processor = getattr(task, "load_processor", None)
    return model, load_processor(folder, model.config) if load_processor else AutoTokenizer.from_pretrained(folder)


def evaluate_model(model: PreTrainedModel, tokenizer: Any, task: Task, data_args: DataArguments,
                   split: str | None = None, batch_size: int = 32) -> tuple[dict[str, float], Any]:
    """Metrics of `model` on a split of the task (default: GLUE validation, CoNLL test), computed as a training
    run's final evaluation is; keys are prefixed `eval_` (validation) or `test_`. Also returns the tokenized split."""
    from transformers import Trainer, TrainingArguments

    split = split or task.eval_splits[-1]
    raw = task.load(data_args)  # your data's tasks learn their splits here
    if split not in task.eval_splits:
        raise ValueError(f"{task.name} has no split {split!r} with labels to evaluate on; use {', '.join(task.eval_splits)}")
    data = task.tokenize(DatasetDict({split: raw[split]}), tokenizer, task.sequence_length(data_args))[split]
    with tempfile.TemporaryDirectory() as scratch:  # evaluation writes nothing; the Trainer still wants a folder
        args = TrainingArguments(output_dir=scratch, per_device_eval_batch_size=batch_size, report_to="none")
        trainer = Trainer(model=model, args=args, processing_class=tokenizer, data_collator=task.collator(tokenizer),
                          compute_metrics=task.compute_metrics())
        metrics = trainer.evaluate(data, metric_key_prefix="eval" if split == "validation" else split)
    return task.add_metrics(metrics), data


__all__ = ["distill_summary", "evaluate_model", "load_for_task", "metric_items", "run_task"]
