"""DenseViT: a plain (dense) ViT image classifier, the dense twin that V-MoE teachers are gathered into.

Importing this package registers the model with the transformers Auto classes (idempotent) and marks the classes
for `auto_map`, so `save_pretrained` copies `configuration_dense_vit.py` / `modeling_dense_vit.py` next to the
weights and the checkpoint also loads with `trust_remote_code=True` where hf_moekd is not installed. Checkpoints
saved before the rename (model_type "ones") still load through the Auto classes (see `legacy`).
"""
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from .configuration_dense_vit import DenseViTConfig, ViTBackboneConfig
from .legacy import register_legacy_ones
from .modeling_dense_vit import (
    DenseViTForImageClassification,
    DenseViTModel,
    DenseViTPreTrainedModel,
    image_classification_loss,
)

_AUTO_MODELS = (
    (AutoModel, DenseViTModel),
    (AutoModelForImageClassification, DenseViTForImageClassification),
)


# Copied from hf_moekd.models.minimoe.register with MiniMoE->DenseViT
def register() -> None:
    """Register the model with AutoConfig and the Auto classes of `_AUTO_MODELS`, and mark its classes for
    `auto_map` (safe to repeat)."""
    AutoConfig.register(DenseViTConfig.model_type, DenseViTConfig, exist_ok=True)
    DenseViTConfig.register_for_auto_class()
    for auto_class, model_class in _AUTO_MODELS:
        auto_class.register(DenseViTConfig, model_class, exist_ok=True)
        model_class.register_for_auto_class(auto_class.__name__)


register()
register_legacy_ones()

__all__ = [
    "DenseViTConfig",
    "DenseViTForImageClassification",
    "DenseViTModel",
    "DenseViTPreTrainedModel",
    "ViTBackboneConfig",
    "image_classification_loss",
    "register",
]
