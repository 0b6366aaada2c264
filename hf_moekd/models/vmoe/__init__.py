"""V-MoE (Riquelme et al., 2021): a pre-LayerNorm ViT with top-k Mixture-of-Experts MLPs in every other block.

Importing this package registers the model with the transformers Auto classes (idempotent) and marks the classes
for `auto_map`, so `save_pretrained` copies `configuration_vmoe.py` / `modeling_vmoe.py` next to the weights and
the checkpoint also loads with `trust_remote_code=True` where hf_moekd is not installed.
"""
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from . import modeling_vmoe
from .configuration_vmoe import MOE_FIELDS, VMoEConfig
from .modeling_vmoe import *  # noqa: F403  (its __all__)

_AUTO_MODELS = (
    (AutoModel, VMoEModel),
    (AutoModelForImageClassification, VMoEForImageClassification),
)


# Copied from hf_moekd.models.minimoe.register with MiniMoE->VMoE
def register() -> None:
    """Register the model with AutoConfig and the Auto classes of `_AUTO_MODELS`, and mark its classes for
    `auto_map` (safe to repeat)."""
    AutoConfig.register(VMoEConfig.model_type, VMoEConfig, exist_ok=True)
    VMoEConfig.register_for_auto_class()
    for auto_class, model_class in _AUTO_MODELS:
        auto_class.register(VMoEConfig, model_class, exist_ok=True)
        model_class.register_for_auto_class(auto_class.__name__)


register()

__all__ = [*modeling_vmoe.__all__, "MOE_FIELDS", "VMoEConfig", "register"]
