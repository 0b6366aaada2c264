"""How each supported kind of model keeps its stem, blocks and head, and how to call one block on its own.

Two layouts, each covering a dense model (teacher, meta model) and its modular MoE twin (student):

* `vit`: DenseViT and V-MoE image classifiers. Stem `<base>.embeddings`, blocks `<base>.encoder.layer`,
  head `<base>.layernorm` then `classifier` on the CLS token.
* `bert`: BERT (e.g. MiniLM) and MiniMoE sequence classifiers. Stem `<base>.embeddings`, blocks
  `<base>.encoder.layer`, head `<base>.pooler`, `dropout`, `classifier`.

Running stem, blocks and head one after the other computes exactly what the model's own `forward` computes.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.masking_utils import create_bidirectional_mask

from ..models.minimoe.modeling_minimoe import MiniMoELayer
from ..models.minimoe.modeling_minimoe import load_balancing_loss as minimoe_balancing_loss
from ..models.vmoe.modeling_vmoe import VMoELayer
from ..models.vmoe.modeling_vmoe import load_balancing_loss as vmoe_balancing_loss

Inputs = dict[str, torch.Tensor]
Routers = tuple[torch.Tensor, ...]


class Layout:
    """How one kind of model is cut into stem / blocks / head (submodule names) and how each piece is called."""

    name: str = ""
    model_types: tuple[str, ...] = ()
    dense_type: str = ""  # the monolithic member: teachers and meta models
    head_names: tuple[str, ...] = ()  # submodules of the model; `{base}` is its base_model_prefix

    def parts(self, model: PreTrainedModel) -> tuple[list[str], str, list[str]]:
        """Qualified names of the stem modules, of the block list and of the head modules, in call order."""
        base = model.base_model_prefix
        return [f"{base}.embeddings"], f"{base}.encoder.layer", [n.format(base=base) for n in self.head_names]

    def embed(self, stem: nn.ModuleDict, inputs: Inputs) -> torch.Tensor:
        raise NotImplementedError

    def block(self, config: PreTrainedConfig, block: nn.Module, hidden: torch.Tensor,
              inputs: Inputs) -> tuple[torch.Tensor, Routers]:
        """One block: `(hidden, router logits of its MoE layers)`."""
        raise NotImplementedError

    def head(self, head: nn.ModuleDict, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def aux_loss(self, config: PreTrainedConfig, routers: Routers, inputs: Inputs) -> torch.Tensor:
        """The model's load-balancing loss over `routers` (as its own forward computes it)."""
        raise NotImplementedError


class ViTLayout(Layout):
    name, model_types, dense_type = "vit", ("dense_vit", "vmoe"), "dense_vit"
    head_names = ("{base}.layernorm", "classifier")

    def embed(self, stem: nn.ModuleDict, inputs: Inputs) -> torch.Tensor:
        return stem["embeddings"](inputs["pixel_values"])

    def block(self, config, block, hidden, inputs):
        output = block(hidden)
        return output[0], ((output[1],) if isinstance(block, VMoELayer) and output[1] is not None else ())

    def head(self, head: nn.ModuleDict, hidden: torch.Tensor) -> torch.Tensor:
        return head["classifier"](head["layernorm"](hidden)[:, 0])

    def aux_loss(self, config, routers, inputs):
        return vmoe_balancing_loss(routers, config.num_experts_per_tok)


class BertLayout(Layout):
    name, model_types, dense_type = "bert", ("bert", "minimoe"), "bert"
    head_names = ("{base}.pooler", "dropout", "classifier")

    def parts(self, model: PreTrainedModel) -> tuple[list[str], str, list[str]]:
        if not type(model).__name__.endswith("ForSequenceClassification"):
            raise ValueError(f"m2mKD on text needs sequence classifiers (BertForSequenceClassification, "
                             f"MiniMoEForSequenceClassification), got {type(model).__name__}.")
        return super().parts(model)

    def embed(self, stem: nn.ModuleDict, inputs: Inputs) -> torch.Tensor:
        return stem["embeddings"](input_ids=inputs["input_ids"], token_type_ids=inputs.get("token_type_ids"))

    def block(self, config, block, hidden, inputs):
        mask = inputs.get("attention_mask")
        if isinstance(block, MiniMoELayer):
            hidden, ffn, attention, _ = block(hidden, None if mask is None else mask.bool()[:, None, None, :])
            return hidden, tuple(r for r in (ffn, attention) if r is not None)
        # BERT's own mask (None, boolean or additive by attention kernel), as BertModel.forward builds it
        return block(hidden, create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=mask)), ()

    def head(self, head: nn.ModuleDict, hidden: torch.Tensor) -> torch.Tensor:
        return head["classifier"](head["dropout"](head["pooler"](hidden)))

    def aux_loss(self, config, routers, inputs):
        return minimoe_balancing_loss(routers, inputs.get("attention_mask"))


LAYOUTS: tuple[Layout, ...] = (ViTLayout(), BertLayout())


def layout_of(model: Any) -> Layout:
    """The layout of `model` (by `config.model_type`); a clear error for unsupported models."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for layout in LAYOUTS:
        if model_type in layout.model_types:
            return layout
    supported = ", ".join(f"{t} ({f.name})" for f in LAYOUTS for t in f.model_types)
    raise ValueError(f"m2mKD cannot split a {model_type or type(model).__name__!r} model; supported: {supported}.")


__all__ = ["LAYOUTS", "BertLayout", "Layout", "ViTLayout", "layout_of"]
