"""V-MoE -> DenseViT: the dense twin's config, and a twin holding every non-expert weight of the V-MoE.

The two image models are self-contained (each ships its own code with its checkpoints), so what joins them lives
here, on the gathering side.
"""
from __future__ import annotations

from copy import deepcopy
from dataclasses import fields

import torch

from ..models.dense_vit import DenseViTConfig, DenseViTForImageClassification, DenseViTModel
from ..models.dense_vit.modeling_dense_vit import DenseViTMLP, DenseViTPreTrainedModel
from ..models.vmoe import MOE_FIELDS, VMoEConfig, VMoEForImageClassification, VMoEModel
from ..models.vmoe.modeling_vmoe import VMoEPreTrainedModel


def dense_vit_config(config: VMoEConfig) -> DenseViTConfig:
    """The `DenseViTConfig` of the same backbone (every non-expert field, labels included), no MoE fields."""
    skip = {"transformers_version", "architectures", *MOE_FIELDS}
    names = [f.name for f in fields(DenseViTConfig) if f.init and f.name not in skip]
    dense = DenseViTConfig(**{name: deepcopy(getattr(config, name)) for name in names})
    dense._attn_implementation = config._attn_implementation
    return dense


@torch.no_grad()
def dense_vit_from_vmoe_nonexpert(
    vmoe_model: VMoEPreTrainedModel,
) -> tuple[DenseViTPreTrainedModel, list[tuple[int, DenseViTMLP]]]:
    """The dense DenseViT twin of `vmoe_model` and the MLPs the gathering code must still fill.

    Returns `(dense_model, pending)`: `dense_model` is a `DenseViTForImageClassification` (for a
    `VMoEForImageClassification`) or `DenseViTModel` (for a `VMoEModel`) with config `dense_vit_config(...)`, on the
    same device/dtype and in the same train/eval mode. Every non-expert weight is copied exactly (embeddings,
    attention, LayerNorms, dense-block MLPs, head). `pending` lists `(block_index, mlp)` for the MoE blocks
    (`config.moe_layers`), whose `mlp.fc1` / `mlp.fc2` keep their fresh initialisation until gathered: with
    `fc1 = (w_in[e], b_in[e])`, `fc2 = (w_out[e], b_out[e])` of an expert shared by all experts, the twin
    reproduces the V-MoE exactly (given `normalize_topk_weights=True`).
    """
    if isinstance(vmoe_model, VMoEForImageClassification):
        target = DenseViTForImageClassification
    elif isinstance(vmoe_model, VMoEModel):
        target = DenseViTModel
    else:
        raise TypeError(f"Expected VMoEModel or VMoEForImageClassification, got {type(vmoe_model).__name__}.")
    reference = next(vmoe_model.parameters())
    dense = target(dense_vit_config(vmoe_model.config))
    dense = dense.to(device=reference.device, dtype=reference.dtype).train(vmoe_model.training)
    prefix = f"{dense.base_model_prefix}." if target is DenseViTForImageClassification else ""

    def rename(name: str) -> str:
        return prefix + name[len("vmoe."):] if name.startswith("vmoe.") else name

    source = {rename(name): tensor for name, tensor in vmoe_model.state_dict().items()}
    pending_prefixes = tuple(f"{prefix}encoder.layer.{i}.mlp." for i in vmoe_model.config.moe_layers)
    for name, tensor in dense.state_dict().items():
        if name.startswith(pending_prefixes):
            continue
        if name not in source or source[name].shape != tensor.shape:
            raise ValueError(f"Cannot copy {name} {tuple(tensor.shape)} from the V-MoE model.")
        tensor.copy_(source[name])
    layers = dense.base_model.encoder.layer
    return dense, [(i, layers[i].mlp) for i in vmoe_model.config.moe_layers]


__all__ = ["dense_vit_config", "dense_vit_from_vmoe_nonexpert"]
