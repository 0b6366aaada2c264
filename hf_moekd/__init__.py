"""hf_moekd: knowledge distillation between sparse Mixture-of-Experts and dense models.

The public API loads lazily, as transformers' does: `import hf_moekd` registers the models with the Auto classes
and stays fast; `from hf_moekd import DistillationTrainer` imports the distillation package on first use. The
`TYPE_CHECKING` block names the same objects for type checkers and IDEs (tests/test_layers.py checks they agree).
Recipes and study pipelines are not part of it: import them from `hf_moekd.recipes` / `hf_moekd.studies.*`.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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

__version__ = "0.1.0"  # the package version: pyproject.toml reads it from here

# subpackage -> the names it gives the top level; each loads on first use
_import_structure: dict[str, list[str]] = {
    "distillation": ["DistillationArguments", "DistillationBatch", "DistillationTrainer", "LossTerm",
                     "precompute_teacher_logits", "register_loss"],
    "ones": ["GatheringConfig", "gather_experts", "merge_experts", "register_family", "register_strategy"],
    "mode": ["MoDEConfig", "MoDETrainer", "MoDETrainerMixin"],
    "opdf": ["MPOConfig", "MPOConstraintLoss", "contract_overparameterized", "mpo_contract", "mpo_decompose",
             "overparameterize"],
    "analysis": ["probe_experts", "routing_counts"],
    "cards": ["CardMethod", "register_card_method", "write_model_card"],
}

if TYPE_CHECKING:
    from .analysis import probe_experts, routing_counts
    from .cards import CardMethod, register_card_method, write_model_card
    from .distillation import (
        DistillationArguments,
        DistillationBatch,
        DistillationTrainer,
        LossTerm,
        precompute_teacher_logits,
        register_loss,
    )
    from .mode import MoDEConfig, MoDETrainer, MoDETrainerMixin
    from .ones import GatheringConfig, gather_experts, merge_experts, register_family, register_strategy
    from .opdf import (
        MPOConfig,
        MPOConstraintLoss,
        contract_overparameterized,
        mpo_contract,
        mpo_decompose,
        overparameterize,
    )

_LAZY = {name: module for module, names in _import_structure.items() for name in names}
__all__ = [
    "DenseViTConfig", "DenseViTForImageClassification", "DenseViTModel", "MiniMoEConfig",
    "MiniMoEForSequenceClassification", "MiniMoEForTokenClassification", "MiniMoEModel", "VMoEConfig",
    "VMoEForImageClassification", "VMoEModel",
    "minimoe_from_dense", *_LAZY, "__version__",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later look-ups skip __getattr__
        return value
    raise AttributeError(f"module 'hf_moekd' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
