"""MiniMoE student models (Zhang et al., ACL 2023): BERT-like encoders with top-1 Mixture-of-Experts layers.

Importing this package registers the model with the transformers Auto classes (idempotent) and marks the classes
for `auto_map`, so `save_pretrained` copies `configuration_minimoe.py` / `modeling_minimoe.py` next to the weights
and the checkpoint also loads with `trust_remote_code=True` where hf_moekd is not installed.
"""
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from . import modeling_minimoe
from .configuration_minimoe import MiniMoEConfig
from .convert_minimoe import minimoe_from_dense
from .modeling_minimoe import *  # noqa: F403  (its __all__)


_AUTO_MODELS = (
    (AutoModel, MiniMoEModel),
    (AutoModelForSequenceClassification, MiniMoEForSequenceClassification),
    (AutoModelForTokenClassification, MiniMoEForTokenClassification),
)


def register() -> None:
    """Register the model with AutoConfig and the Auto classes of `_AUTO_MODELS`, and mark its classes for
    `auto_map` (safe to repeat)."""
    AutoConfig.register(MiniMoEConfig.model_type, MiniMoEConfig, exist_ok=True)
    MiniMoEConfig.register_for_auto_class()
    for auto_class, model_class in _AUTO_MODELS:
        auto_class.register(MiniMoEConfig, model_class, exist_ok=True)
        model_class.register_for_auto_class(auto_class.__name__)


register()

__all__ = [*modeling_minimoe.__all__, "MiniMoEConfig", "minimoe_from_dense", "register"]
