"""hf_moekd: knowledge distillation between sparse Mixture-of-Experts and dense models."""
from __future__ import annotations

import importlib
from typing import Any

from .models import minimoe as _minimoe  # noqa: F401  (registers the models with the Auto classes)
from .models import ones as _ones  # noqa: F401
from .models import vmoe as _vmoe  # noqa: F401

__version__ = "0.1.0"

# Heavy submodules load on first use, so `import hf_moekd.data` stays fast.
_LAZY = {
    "DistillationArguments": "hf_moekd.distillation",
    "DistillationTrainer": "hf_moekd.distillation",
    "precompute_teacher_logits": "hf_moekd.distillation",
    "register_loss": "hf_moekd.distillation",
    "MoDEConfig": "hf_moekd.mode",
    "MoDETrainer": "hf_moekd.mode",
    "probe_experts": "hf_moekd.analysis",
}
__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hf_moekd' has no attribute {name!r}")
