"""The task recipe: fine-tune or distil a student on a GLUE task or CoNLL-2003 NER, and evaluate saved models.

One code path for `hf-moekd distill`, `hf-moekd evaluate`, examples/run_glue.py and examples/run_conll.py.
"""
from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from datasets import DatasetDict
from transformers import (
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    DataCollatorForTokenClassification,
    DataCollatorWithPadding,
    PreTrainedModel,
    set_seed,
)

from ..analysis import has_experts, routing_counts
from ..callbacks import CSVLoggerCallback
from ..data import CONLL_LABELS, GLUE_TASKS, get_glue_task, load_conll, load_glue, training_subset
from ..distillation import DistillationArguments, DistillationTrainer
from ..distillation.engines import is_zero3
from ..metrics import conll_compute_metrics, glue_compute_metrics
from ..modeling.parameters import count_parameters
from ..plots import plot_loss_terms, plot_routing
from ..utils import NOT_METRIC_SUFFIXES, markdown_table, refuse_pickle
from .common import check_output_dir, configure_losses, removed_on_failure, resume_checkpoint, save_run
from .files import ClassifierTask, FileTask, TextClassificationTask, TokenClassificationTask, align_labels
from .lm import CausalLMTask, LanguageModelTask, Seq2SeqTask
from .students import ModelArguments, build_model, model_for_saving

CONLL = "conll2003"
TASK_NAMES = (*GLUE_TASKS, "conll", "text-classification", "ner", "clm", "seq2seq")


@dataclass
class DataArguments:
    data_dir: str | None = field(
        default=None,
        metadata={"help": "GLUE: the folder holding SST-2/, CoLA/, ... (original TSVs); CoNLL: the folder holding "
                  "train.txt, valid.txt, test.txt; a folder holding glue/ and conll2003/ works for both. None: the Hub."},
    )
    max_seq_length: int = field(default=128, metadata={"help": "Longer inputs (in word pieces) are truncated."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on a fixed random subset this large."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first N examples of each "
                                                                         "evaluation split."})
    dataset_name: str | None = field(default=None, metadata={"help": "Your own data, instead of the files: a dataset "
                                                             "on the Hub (datasets.load_dataset) or a local folder (split "
                                                             "files train.* / validation.* / test.*, or save_to_disk)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The configuration of --dataset_name "
                                                                    "(e.g. sst2 for glue)."})
    train_file: str | None = field(default=None, metadata={"help": "Your own data (--task text-classification, ner, "
                                                           "clm, seq2seq): the training split, .csv / .tsv / .json / "
                                                           ".jsonl / .parquet records or a datasets folder; clm also "
                                                           ".txt (a text per line), ner CoNLL-style column files."})
    validation_file: str | None = field(default=None, metadata={"help": "Your own data: the evaluation split (same "
                                                                "formats as --train_file)."})
    test_file: str | None = field(default=None, metadata={"help": "text-classification / ner: a labelled test split, "
                                                          "evaluated at the end too."})
    text_column_names: str | None = field(default=None, metadata={"help": "text-classification: the text column(s), "
                                                                  "'a' or 'a,b' for pairs (default: sentence1,sentence2 "
                                                                  "/ sentence / text, whichever the file has)."})
    label_column_name: str = field(default="label", metadata={"help": "text-classification: the label column (strings "
                                                              "or ints: classes; floats: regression)."})
    tokens_column_name: str = field(default="tokens", metadata={"help": "ner, json files: the tokens column."})
    tags_column_name: str = field(default="tags", metadata={"help": "ner, json files: the tags column (BIO / IOB1)."})
    text_column: str = field(default="text", metadata={"help": "clm: the column holding the texts (json, datasets)."})
    source_column: str = field(default="source", metadata={"help": "seq2seq: the column holding the inputs."})
    target_column: str = field(default="target", metadata={"help": "seq2seq: the column holding the outputs."})
    block_size: int | None = field(default=None, metadata={"help": "clm: tokens per block; texts are concatenated "
                                                           "and cut into blocks (run_clm.py). Default: max_seq_length."})

    def __post_init__(self) -> None:
        if self.max_seq_length < 1:
            raise ValueError(f"--max_seq_length must be >= 1, got {self.max_seq_length}")
        if self.block_size is not None and self.block_size < 2:
            raise ValueError(f"--block_size must be >= 2 (a token and the next one), got {self.block_size}")


@dataclass
class GlueDataArguments(DataArguments):
    task_name: str = field(default="sst2", metadata={"help": "GLUE task: sst2, cola, mrpc, rte or stsb."})


@dataclass
class TaskArguments:
    task: str = field(metadata={"help": f"The task: {', '.join(TASK_NAMES)} (conll: CoNLL-2003 NER; clm: causal "
                                        "language modelling on --train_file / --validation_file)."})


@dataclass
class ReportArguments:
    log_csv: bool = field(
        default=False,
        metadata={"help": "Write every log line (loss, each loss term, learning rate, evaluation metrics) to "
                  "<output_dir>/log_history.csv (hf_moekd.callbacks.CSVLoggerCallback)."},
    )
    plot: bool = field(
        default=False,
        metadata={"help": "At the end, save PNGs in output_dir: loss_terms.png (training curve of each logged loss "
                  "term) and, for MoE students / teachers, routing_student.png / routing_teacher.png (tokens per "
                  "expert per layer on the evaluation set)."},
    )


@dataclass(frozen=True)
class TaskSpec(ClassifierTask):
    """How one task is read, tokenized, modelled and scored."""

    name: str  # GLUE task name or "conll2003"; recorded in all_results.json
    label_names: tuple[str, ...] | None  # None: regression (STS-B)
    token_level: bool
    eval_splits: tuple[str, ...]

    @property
    def auto_class(self) -> type:
        return AutoModelForTokenClassification if self.token_level else AutoModelForSequenceClassification

    def check_config(self, config: Any, folder: Path) -> None:
        """Refuse a saved model whose head or labels do not fit this task."""
        self.check_head(config, folder)
        names = [config.id2label[i] for i in sorted(config.id2label)]
        if config.num_labels != self.num_labels:
            raise ValueError(f"{folder} has {config.num_labels} labels {names} but {self.name} has {self.num_labels}: "
                             "evaluate it on the task it was trained for")
        if self.label_names and not all(n == f"LABEL_{i}" for i, n in enumerate(names)) \
                and tuple(names) != self.label_names:
            raise ValueError(f"{folder} has labels {names} but {self.name} has {list(self.label_names)}: evaluate it "
                             "on the task it was trained for")

    def load(self, data_args: DataArguments) -> DatasetDict:
        """The task's splits, with the training subset and the evaluation cap of `data_args` applied."""
        data_dir = data_args.data_dir
        if data_dir is not None and (Path(data_dir) / ("conll2003" if self.token_level else "glue")).is_dir():
            data_dir = str(Path(data_dir) / ("conll2003" if self.token_level else "glue"))
        raw = load_conll(data_dir) if self.token_level else load_glue(self.name, data_dir)
        raw["train"] = training_subset(raw["train"], data_args.max_train_samples)
        if data_args.max_eval_samples:
            for split in self.eval_splits:
                raw[split] = raw[split].select(range(min(data_args.max_eval_samples, len(raw[split]))))
        return raw

    def tokenize(self, raw: DatasetDict, tokenizer: Any, max_length: int) -> DatasetDict:
        """Model inputs and labels (CoNLL: the tag of each word on its first word piece)."""
        if self.token_level:
            def encode(batch: dict) -> Any:
                enc = tokenizer(batch["tokens"], is_split_into_words=True, truncation=True, max_length=max_length)
                enc["labels"] = [align_labels(enc.word_ids(i), tags) for i, tags in enumerate(batch["ner_tags"])]
                return enc
        else:
            def encode(batch: dict) -> Any:
                texts = [batch["sentence1"]] + ([batch["sentence2"]] if "sentence2" in batch else [])
                return tokenizer(*texts, truncation=True, max_length=max_length)
        columns = next(iter(raw.values())).column_names
        return raw.map(encode, batched=True, remove_columns=[c for c in columns if self.token_level or c != "label"])

    def collator(self, tokenizer: Any) -> Callable:
        return DataCollatorForTokenClassification(tokenizer) if self.token_level else DataCollatorWithPadding(tokenizer)

    def compute_metrics(self) -> Callable:
        return conll_compute_metrics(self.label_names) if self.token_level else glue_compute_metrics(self.name)


def get_task(name: str) -> TaskSpec | FileTask | LanguageModelTask:
    """A GLUE task (sst2, cola, mrpc, rte, stsb), CoNLL-2003 ("conll" / "conll2003"), causal LM ("clm") or
    sequence-to-sequence ("seq2seq")."""
    if name.lower() == "clm":
        return CausalLMTask()
    if name.lower() == "text-classification":
        return TextClassificationTask()
    if name.lower() in ("ner", "token-classification"):
        return TokenClassificationTask()
    if name.lower() == "seq2seq":
        return Seq2SeqTask()
    if name.lower() in ("conll", CONLL):
        return TaskSpec(CONLL, CONLL_LABELS, True, ("validation", "test"))
    try:
        glue = get_glue_task(name)
    except ValueError as err:
        raise ValueError(f"{err}, conll (CoNLL-2003 NER), clm (causal language modelling) or seq2seq") from None
    return TaskSpec(glue.name, glue.label_names, False, ("validation",))


# ---- distillation ------------------------------------------------------------------------------------
def run_task(task_name: str, model_args: ModelArguments, data_args: DataArguments, args: DistillationArguments,
             report: ReportArguments | None = None) -> dict[str, Any]:
    """Fine-tune (no teacher) or distil the student on the task, save it with its card, evaluate it on the
    evaluation splits, print a summary table; returns what all_results.json holds."""
    start = time.perf_counter()
    report = report or ReportArguments()
    task = get_task(task_name)
    mode = configure_losses(args)
    check_output_dir(args)
    _check_report_to(args)
    with removed_on_failure(args.output_dir):
        raw = task.load(data_args)
        set_seed(args.seed)
        model, tokenizer = build_model(model_args, task.auto_class, args.allow_pickle_checkpoints, **task.head_kwargs())
        data = task.tokenize(raw, tokenizer, task.sequence_length(data_args))
        callbacks = []
        if report.log_csv:
            callbacks.append(CSVLoggerCallback())
        trainer = DistillationTrainer(
            model=model, args=args, train_dataset=data["train"], eval_dataset=data["validation"],
            processing_class=tokenizer, data_collator=task.collator(tokenizer), compute_metrics=task.compute_metrics(),
            callbacks=callbacks,
        )
    results: dict[str, Any] = {"mode": mode, "task": task.name,
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


def _save_plots(trainer: DistillationTrainer, eval_data: Any, task: TaskSpec) -> None:
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
    title = f"\n{results['task']} ({results['mode']}), saved to {trainer.args.output_dir}"
    return f"{title}\n{markdown_table(header, [row[:len(header)] for row in rows])}"


# ---- evaluation of a saved model ---------------------------------------------------------------------
def load_for_task(model_dir: str | Path, task: TaskSpec, allow_pickle: bool = False) -> tuple[PreTrainedModel, Any]:
    """A saved model folder and its tokenizer, checked against the task (head kind, label count, label names)."""
    from transformers import AutoConfig, AutoTokenizer

    folder = Path(model_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    if not (folder / "config.json").is_file() and (folder / "adapter_config.json").is_file():
        raise ValueError(f"{folder} holds a peft adapter, not a whole model: evaluate a run saved with "
                         "--merge_adapters true")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: pass a saved model folder (the output_dir of a run)")
    if not allow_pickle:
        refuse_pickle(folder, "--allow_pickle")
    config = AutoConfig.from_pretrained(folder)
    task.check_config(config, folder)
    model = task.auto_class.from_pretrained(folder, use_safetensors=None if allow_pickle else True)
    return model, AutoTokenizer.from_pretrained(folder)


def evaluate_model(model: PreTrainedModel, tokenizer: Any, task: TaskSpec, data_args: DataArguments,
                   split: str | None = None, batch_size: int = 32) -> tuple[dict[str, float], Any]:
    """Metrics of `model` on a split of the task (default: GLUE validation, CoNLL test), computed as a training
    run's final evaluation is; keys are prefixed `eval_` (validation) or `test_`. Also returns the tokenized split."""
    from transformers import Trainer, TrainingArguments

    split = split or task.eval_splits[-1]
    if split not in task.eval_splits:
        raise ValueError(f"{task.name} has no split {split!r} with labels to evaluate on; use {', '.join(task.eval_splits)}")
    data = task.tokenize(DatasetDict({split: task.load(data_args)[split]}), tokenizer,
                         task.sequence_length(data_args))[split]
    with tempfile.TemporaryDirectory() as scratch:  # evaluation writes nothing; the Trainer still wants a folder
        args = TrainingArguments(output_dir=scratch, per_device_eval_batch_size=batch_size, report_to="none")
        trainer = Trainer(model=model, args=args, processing_class=tokenizer, data_collator=task.collator(tokenizer),
                          compute_metrics=task.compute_metrics())
        metrics = trainer.evaluate(data, metric_key_prefix="eval" if split == "validation" else split)
    return task.add_metrics(metrics), data


__all__ = ["DataArguments", "GlueDataArguments", "ReportArguments", "TASK_NAMES", "TaskArguments", "TaskSpec",
           "align_labels", "distill_summary", "evaluate_model", "get_task", "load_for_task", "metric_items", "run_task"]
