"""OneS: a dense ViT-style image classifier (the dense twin V-MoE teachers are gathered into).

Importing this package registers the model with the transformers Auto classes (idempotent) and marks the classes
for `auto_map`, so `save_pretrained` copies `configuration_ones.py` / `modeling_ones.py` next to the weights and the
checkpoint also loads with `trust_remote_code=True` where hf_moekd is not installed.
"""
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from .configuration_ones import OneSConfig
from .modeling_ones import (
    OneSForImageClassification,
    OneSModel,
    OneSPreTrainedModel,
    image_classification_loss,
)


def register() -> None:
    """Register OneS with AutoConfig / AutoModel / AutoModelForImageClassification (safe to repeat)."""
    AutoConfig.register(OneSConfig.model_type, OneSConfig, exist_ok=True)
    OneSConfig.register_for_auto_class()
    for auto_class, model_class in (
        (AutoModel, OneSModel),
        (AutoModelForImageClassification, OneSForImageClassification),
    ):
        auto_class.register(OneSConfig, model_class, exist_ok=True)
        model_class.register_for_auto_class(auto_class.__name__)


register()

__all__ = [
    "OneSConfig",
    "OneSForImageClassification",
    "OneSModel",
    "OneSPreTrainedModel",
    "image_classification_loss",
    "register",
]
