"""Knowledge distillation with `transformers.Trainer`."""
from .arguments import DistillationArguments
from .losses import LOSS_REGISTRY, DistillationBatch, LossTerm, register_loss
from .teacher import check_compatible, load_teacher
from .teacher_outputs import (
    TEACHER_LOGITS,
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
    "TeacherLogitsCollator",
    "check_compatible",
    "load_teacher",
    "precompute_teacher_logits",
    "register_loss",
]
