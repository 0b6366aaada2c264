"""What a `DistillationTrainer` run declares for its model card (as trl's trainers declare theirs), and the card
sections of plain distillation."""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..cards import CardMethod, RunFacts, card_methods, is_moe, register_card_method, run_facts
from ..integrations.peft import describe_adapter
from .losses import get_loss_class

if TYPE_CHECKING:
    from .trainer import DistillationTrainer

for _method in (
    CardMethod("kd", "Knowledge distillation", ("knowledge-distillation",)),
    CardMethod("fine-tune", "Fine-tuning without a teacher"),
    CardMethod("task-agnostic", "Task-agnostic distillation (stage 1)",
               ("knowledge-distillation", "task-agnostic-distillation")),
):
    register_card_method(_method)

_KEEP = object()


def training_facts(trainer: DistillationTrainer, data: Sequence[str] = (), *, methods: Sequence[str] = (),
                   student_init: str | None | object = _KEEP, recipe: dict[str, Any] | None = None) -> RunFacts:
    """RunFacts of a `DistillationTrainer` run.

    `methods` are what the caller's recipe applied before training (e.g. "opdf"); the model's own method (a
    registered card method that recognises its config) and the loss terms' methods (`LossTerm.card_method`) are
    added, then kd / task-agnostic / fine-tune. `student_init` defaults to the model's `name_or_path`; `recipe`
    holds the student recipe's settings for the hyperparameter table.
    """
    args, model, teacher = trainer.args, trainer.model, trainer.teacher
    weights = dict(trainer.loss_weights)
    teacher_name = args.teacher_model_name_or_path or (getattr(teacher, "name_or_path", None) or None)
    config = model.config.to_dict()
    found = [*methods, *(m.name for m in card_methods().values() if m.recognises and m.recognises(config, {}))]
    found += [method for name in weights if (method := _term_class(trainer, name).card_method)]
    distilled = teacher is not None or teacher_name or "logits_kd" in weights
    found.append("task-agnostic" if args.task_agnostic else "kd" if distilled else "fine-tune")
    adapter = describe_adapter(model, merged=getattr(args, "merge_adapters", False))
    return run_facts(
        list(dict.fromkeys(found)), teacher=teacher_name if distilled else None,
        student_init=(model.name_or_path or None) if student_init is _KEEP else student_init, data=data,
        hyperparameters={**training_hyperparameters(trainer), **(recipe or {}),
                         **({"adapter": adapter} if adapter else {})},
        tags=["mixture-of-experts"] if teacher is not None and is_moe(teacher.config.to_dict()) else [],
        device=_device(args),
    )


def _term_class(trainer: DistillationTrainer, name: str) -> type:
    term = trainer.loss_terms[name] if name in trainer.loss_terms else None
    return type(term) if term is not None else get_loss_class(name)


def training_hyperparameters(trainer: DistillationTrainer) -> dict[str, Any]:
    """The optimisation settings, the loss weights, and the settings each loss term in use declares."""
    args, weights = trainer.args, dict(trainer.loss_weights)
    hp: dict[str, Any] = {"learning_rate": args.learning_rate}
    hp |= {"max_steps": args.max_steps} if args.max_steps > 0 else {"num_train_epochs": args.num_train_epochs}
    hp |= {
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "total_train_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
        "weight_decay": args.weight_decay,
        "lr_scheduler_type": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
        "warmup_steps": args.warmup_steps,
        "seed": args.seed,
        "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        "loss_weights": weights,
    }
    for name in weights:
        hp |= {setting: getattr(args, setting) for setting in _term_class(trainer, name).card_settings}
    if options := {name: opts for name, (_, opts) in args.loss_term_specs().items() if opts}:
        hp["loss_term_options"] = options
    return hp


def _device(args: Any) -> str:
    device = args.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return f"{args.world_size} x {name}" if args.world_size > 1 else name
