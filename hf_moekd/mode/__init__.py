"""MoDE: Mixture-of-Experts with mutual distillation among the experts (arXiv 2402.00893).

    from hf_moekd.mode import MoDEConfig, MoDETrainer
    trainer = MoDETrainer(model=moe, args=TrainingArguments(...), train_dataset=...,
                          mode_config=MoDEConfig(mode_alpha=0.003, variant="routed"))

or, with `DistillationTrainer`, ``DistillationArguments(extra_loss_terms=["mode=0.003"])`` (all experts) /
``["mode=0.003,variant=routed"]`` (the routed experts). `config` holds the settings, `losses` the registered
``mode`` / ``mode_all`` loss terms, `trainer` the mixin for any `transformers.Trainer`, `card` the card section.
Expert probing and diversity measures are in `hf_moekd.analysis`.
"""
from . import card as _card  # noqa: F401  (registers the card section)
from .collapse import CollapseWatch, mean_pairwise_cosine
from .config import DEFAULT_MODE_ALPHA, VARIANTS, MoDEConfig, check_mode
from .losses import MoDEAllLoss, MoDELoss, mode_loss_per_example, mutual_distillation, real_tokens
from .trainer import MoDETrainer, MoDETrainerMixin
from ..model_utils.experts import ExpertCall, find_experts, only_expert, patch_experts

__all__ = [
    "DEFAULT_MODE_ALPHA",
    "VARIANTS",
    "CollapseWatch",
    "mean_pairwise_cosine",
    "ExpertCall",
    "MoDEAllLoss",
    "MoDEConfig",
    "MoDELoss",
    "MoDETrainer",
    "MoDETrainerMixin",
    "check_mode",
    "find_experts",
    "mode_loss_per_example",
    "mutual_distillation",
    "only_expert",
    "patch_experts",
    "real_tokens",
]
