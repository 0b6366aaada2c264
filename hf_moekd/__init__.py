"""hf_moekd: knowledge distillation between sparse Mixture-of-Experts and dense models.

The public API loads lazily, as transformers' does: `import hf_moekd` registers the models with the Auto classes
and stays fast; `from hf_moekd import DistillationTrainer` imports the distillation package on first use.
"""
from __future__ import annotations

import importlib
from typing import Any

from .models import dense_vit as _dense_vit  # noqa: F401  (registers the models with the Auto classes)
from .models import minimoe as _minimoe  # noqa: F401
from .models import vmoe as _vmoe  # noqa: F401
from .models.dense_vit import DenseViTConfig, DenseViTForImageClassification, DenseViTModel
from .models.minimoe import (
    MiniMoEConfig,
    MiniMoEForSequenceClassification,
    MiniMoEForTokenClassification,
    MiniMoEModel,
    minimoe_from_dense,
)
from .models.vmoe import VMoEConfig, VMoEForImageClassification, VMoEModel

__version__ = "0.1.0"

# name -> module; heavy modules load on first use
_LAZY = {
    **dict.fromkeys(["DistillationArguments", "DistillationTrainer", "LossTerm", "precompute_teacher_logits",
                     "register_loss", "training_facts"], "hf_moekd.distillation"),
    **dict.fromkeys(["gather_experts", "merge_experts", "register_family", "register_strategy"], "hf_moekd.ones"),
    **dict.fromkeys(["MoDEConfig", "MoDETrainer", "MoDETrainerMixin"], "hf_moekd.mode"),
    **dict.fromkeys(["MPOConstraintLoss", "contract", "mpo_contract", "mpo_decompose", "overparameterize"],
                    "hf_moekd.opdf"),
    **dict.fromkeys(["probe_experts", "routing_counts"], "hf_moekd.analysis"),
    **dict.fromkeys(["CardMethod", "register_card_method", "write_model_card"], "hf_moekd.cards"),
    **dict.fromkeys(["OneSArguments", "run_ones"], "hf_moekd.studies.ones"),
    **dict.fromkeys(["M2MArguments", "run_m2mkd"], "hf_moekd.studies.m2mkd"),
    **dict.fromkeys(["ModelArguments"], "hf_moekd.recipes"),
}
__all__ = [
    "DenseViTConfig", "DenseViTForImageClassification", "DenseViTModel", "MiniMoEConfig",
    "MiniMoEForSequenceClassification", "MiniMoEForTokenClassification", "MiniMoEModel", "VMoEConfig",
    "VMoEForImageClassification", "VMoEModel",
    "minimoe_from_dense", *_LAZY, "__version__",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hf_moekd' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
