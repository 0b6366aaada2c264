"""V-MoE (Riquelme et al., 2021): the OneS ViT backbone with top-k Mixture-of-Experts MLPs in every other block.

Importing this package registers V-MoE with AutoConfig / AutoModel / AutoModelForImageClassification (idempotent).
It is not marked for `auto_map`: V-MoE checkpoints load where hf_moekd is importable (and imported).
"""
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from .configuration_vmoe import MOE_FIELDS, VMoEConfig
from .modeling_vmoe import (
    VMoEForImageClassification,
    VMoEImageClassifierOutput,
    VMoEModel,
    VMoEModelOutput,
    VMoEPreTrainedModel,
    load_balancing_loss,
    ones_from_vmoe_nonexpert,
    top_k_routing,
    vmoe_expert_weights,
)


def register() -> None:
    """Register V-MoE with AutoConfig / AutoModel / AutoModelForImageClassification (safe to repeat)."""
    AutoConfig.register(VMoEConfig.model_type, VMoEConfig, exist_ok=True)
    AutoModel.register(VMoEConfig, VMoEModel, exist_ok=True)
    AutoModelForImageClassification.register(VMoEConfig, VMoEForImageClassification, exist_ok=True)


register()

__all__ = [
    "MOE_FIELDS",
    "VMoEConfig",
    "VMoEForImageClassification",
    "VMoEImageClassifierOutput",
    "VMoEModel",
    "VMoEModelOutput",
    "VMoEPreTrainedModel",
    "load_balancing_loss",
    "ones_from_vmoe_nonexpert",
    "register",
    "top_k_routing",
    "vmoe_expert_weights",
]
