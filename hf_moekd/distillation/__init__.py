"""Knowledge distillation with `transformers.Trainer`."""
from .arguments import DistillationArguments
from .card import training_facts
from .losses import LOSS_REGISTRY, DistillationBatch, LossTerm, get_loss_class, register_loss
from .teacher import check_compatible, load_teacher
from .teacher_outputs import (
    TEACHER_LOGITS,
    TEACHER_TOPK_INDICES,
    TEACHER_TOPK_LOGPROBS,
    TeacherLogitsCollator,
    precompute_teacher_logits,
)
from .trainer import DistillationTrainer

__all__ = [
    "DistillationArguments",
    "DistillationBatch",
    "DistillationTrainer",
    "LOSS_REGISTRY",
    "LossTerm",
    "TEACHER_LOGITS",
    "TEACHER_TOPK_INDICES",
    "TEACHER_TOPK_LOGPROBS",
    "TeacherLogitsCollator",
    "check_compatible",
    "get_loss_class",
    "load_teacher",
    "precompute_teacher_logits",
    "register_loss",
    "training_facts",
]
