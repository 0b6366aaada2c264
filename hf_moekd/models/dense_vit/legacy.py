"""Checkpoints saved before DenseViT was renamed: model_type "ones", `OneS*` classes, weights under `ones.`.

`register_legacy_ones` registers model_type "ones" with the Auto classes (thin aliases of the DenseViT classes) and
a weight renaming `ones.` -> `dense_vit.`, so `AutoModelForImageClassification.from_pretrained(old_dir)` loads such
a checkpoint as before (and `save_pretrained` writes it back in the old layout). With `trust_remote_code=True` an
old checkpoint runs the code saved next to it instead and needs none of this. Not copied next to checkpoints.
"""
from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification
from transformers.conversion_mapping import WeightRenaming, register_checkpoint_conversion_mapping

from .configuration_dense_vit import DenseViTConfig
from .modeling_dense_vit import DenseViTForImageClassification, DenseViTModel

LEGACY_MODEL_TYPE = "ones"


@strict
class OneSConfig(DenseViTConfig):
    """`DenseViTConfig` under the model_type checkpoints were saved with before the rename."""

    model_type = LEGACY_MODEL_TYPE
    _auto_class = None  # not marked for auto_map: new checkpoints are saved as DenseViT


class OneSModel(DenseViTModel):
    config_class = OneSConfig
    _auto_class = None


class OneSForImageClassification(DenseViTForImageClassification):
    config_class = OneSConfig
    _auto_class = None


def register_legacy_ones() -> None:
    """Register model_type "ones" and its weight renaming with transformers (safe to repeat)."""
    AutoConfig.register(LEGACY_MODEL_TYPE, OneSConfig, exist_ok=True)
    AutoModel.register(OneSConfig, OneSModel, exist_ok=True)
    AutoModelForImageClassification.register(OneSConfig, OneSForImageClassification, exist_ok=True)
    renaming = [WeightRenaming(source_patterns=r"^ones\.", target_patterns="dense_vit.")]
    register_checkpoint_conversion_mapping(LEGACY_MODEL_TYPE, renaming, overwrite=True)
