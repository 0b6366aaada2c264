"""Pieces shared by the recipes and example scripts: loss set-up, output folders, saving a run, user errors."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from ..cards import CARD_KEY
from ..distillation import DistillationArguments, DistillationTrainer, training_facts
from ..utils.quiet import silence_expected_noise

if TYPE_CHECKING:
    from .arguments import ModelArguments

# OSError covers missing/corrupt files (FileNotFoundError, FileExistsError, ...) and full disks.
USER_ERRORS = (ValueError, OSError, FloatingPointError)


def configure_losses(args: DistillationArguments) -> tuple[str, DistillationArguments]:
    """The run mode and the run's arguments: ('distil', args) with a teacher; without one ('fine-tune', a copy of
    `args` with alpha 0), which trains on the labels alone. `args` itself is not changed."""
    if args.teacher_model_name_or_path:
        return "distil", args
    if args.hidden_loss_weight or args.attention_relation_weight:
        raise ValueError("Intermediate KD losses need a teacher: pass --teacher_model_name_or_path.")
    return "fine-tune", dataclasses.replace(args, alpha=0.0)


def check_output_dir(args: DistillationArguments) -> None:
    """Refuse to write into a non-empty output folder unless asked to overwrite or resume."""
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--output_dir {out} is a file, not a folder: pass a folder path (it is created)")
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
    trainer.model_card_facts = facts = training_facts(trainer, data, **(model_args.card_facts() if model_args else {}))
    if trainer.is_world_process_zero():
        save_results(trainer.args.output_dir, {**results, CARD_KEY: facts.to_dict()})
    if model_saved and trainer.args.push_to_hub:
        trainer.push_to_hub()  # saves the model again, writes the card, uploads (main process)
    elif model_saved:
        trainer.create_model_card()


def run(main: Callable[[], Any]) -> None:
    """Run a script's `main`, turning user errors into one line on stderr and exit code 2.

    Set HF_MOEKD_DEBUG=1 to get the traceback instead. Expected noise (DeepSpeed's CPU notice, the pin_memory
    warning) is silenced first.
    """
    silence_expected_noise()
    try:
        main()
    except USER_ERRORS as err:
        if os.environ.get("HF_MOEKD_DEBUG"):
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
