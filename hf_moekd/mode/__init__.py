"""MoDE: Mixture-of-Experts with mutual distillation among the experts (arXiv 2402.00893).

    from hf_moekd.mode import MoDEConfig, MoDETrainer
    trainer = MoDETrainer(model=moe, args=TrainingArguments(...), train_dataset=...,
                          mode_config=MoDEConfig(mode_alpha=0.1, mode="routed"))

or, with `DistillationTrainer`, ``DistillationArguments(extra_loss_terms=["mode=0.1"])`` (routed) /
``["mode=0.1,variant=all"]`` (all experts). Expert probing and diversity measures are in `hf_moekd.analysis`.
Importing this package registers the ``mode`` and ``mode_all`` loss terms.
"""
from ..cards import CardMethod, register_card_method
from ..modeling.experts import ExpertCall, find_experts, only_expert, patch_experts
from .loss import (
    MODES,
    MoDEAllLoss,
    MoDEConfig,
    MoDELoss,
    MoDETrainer,
    MoDETrainerMixin,
    check_mode,
    mode_loss_per_example,
    mutual_distillation,
)

register_card_method(CardMethod("mode", "MoDE: mutual distillation among the experts",
                                ("mode", "mutual-distillation", "mixture-of-experts")))

__all__ = [
    "MODES",
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
]
