"""PyTorch V-MoE: a pre-LayerNorm ViT (DenseViT's backbone) with top-k Mixture-of-Experts MLPs in every other block.

Reference: "Scaling Vision with Sparse Mixture of Experts" (Riquelme et al., NeurIPS 2021).

Design (see `VMoEConfig` for the knobs):

* Embeddings, attention, LayerNorms, dense MLPs and the head are DenseViT's modules under the same names
  (`vmoe.embeddings.*`, `vmoe.encoder.layer.N.{layernorm_before, attention.*, layernorm_after}`, `vmoe.layernorm`,
  `classifier`); dense blocks keep `mlp.{fc1, fc2}`.
* MoE blocks (`config.moe_layers`, by default 1, 3, 5, ...) have `mlp.router.gate` (`Linear(H, E, bias=False)`) and
  fused experts `mlp.experts.{w_in [E, I, H], b_in [E, I], w_out [E, H, I], b_out [E, H]}` (MiniMoE's layout).
* Routing, capacity-free: softmax over the E gate logits, every token goes to its top-k experts with those
  probabilities as weights (renormalised to sum 1 when `normalize_topk_weights`). Tokens are grouped per expert, so
  each token runs exactly k expert FFNs. The returned `router_logits` are the logits used for routing (after jitter).
* `aux_loss` = mean over MoE blocks of `E * sum_e fraction_e * mean_prob_e`, where `fraction_e` is the fraction of
  tokens that have e among their top-k (Mixtral's convention: it sums to k over experts, so perfectly balanced
  routing gives k; k = 1 is the Switch loss) and `mean_prob_e` the mean softmax probability of e.

This file is copied next to saved checkpoints for `trust_remote_code=True` loading: it imports only torch,
transformers and `.configuration_vmoe` (the DenseViT and MiniMoE parts it shares are checked copies, marked
`# Copied from`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_vmoe import VMoEConfig


@dataclass
class VMoEModelOutput(ModelOutput):
    """Base model output. `router_logits[j]` is the j-th MoE block's router logits `[batch, seq, num_experts]`;
    `aux_loss` is the load-balancing loss (see the module docstring)."""

    last_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None
    aux_loss: torch.FloatTensor | None = None


@dataclass
class VMoEImageClassifierOutput(ModelOutput):
    """Image classification output; `loss` already includes `router_aux_loss_coef * aux_loss`."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None
    aux_loss: torch.FloatTensor | None = None


# Copied from hf_moekd.models.minimoe.modeling_minimoe.eager_attention_forward
def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention; `attention_mask` is boolean (True = attend) or additive. Returns `[B, S, heads, d]`."""
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    weights = scores.softmax(-1)
    output = torch.matmul(F.dropout(weights, p=dropout, training=module.training), value)
    return output.transpose(1, 2).contiguous(), weights


# Copied from hf_moekd.models.dense_vit.modeling_dense_vit.DenseViTPatchEmbeddings with DenseViT->VMoE
class VMoEPatchEmbeddings(nn.Module):
    """Non-overlapping patches -> `[B, num_patches, H]` with a strided convolution."""

    def __init__(self, config: VMoEConfig):
        super().__init__()
        self.projection = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projection(pixel_values).flatten(2).transpose(1, 2)


# Copied from hf_moekd.models.dense_vit.modeling_dense_vit.DenseViTEmbeddings with DenseViT->VMoE
class VMoEEmbeddings(nn.Module):
    """CLS token + patch embeddings + learned position embeddings, dropout."""

    def __init__(self, config: VMoEConfig):
        super().__init__()
        self.config = config
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.patch_embeddings = VMoEPatchEmbeddings(config)
        self.position_embeddings = nn.Parameter(torch.zeros(1, config.num_patches + 1, config.hidden_size))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        expected = (self.config.num_channels, self.config.image_size, self.config.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values must be [batch, {expected[0]}, {expected[1]}, {expected[2]}] (num_channels, "
                f"image_size, image_size of the config), got {tuple(pixel_values.shape)}."
            )
        patches = self.patch_embeddings(pixel_values.to(self.patch_embeddings.projection.weight.dtype))
        cls = self.cls_token.expand(patches.shape[0], -1, -1)
        return self.dropout(torch.cat([cls, patches], dim=1) + self.position_embeddings)


# Copied from hf_moekd.models.dense_vit.modeling_dense_vit.DenseViTAttention with DenseViT->VMoE
class VMoEAttention(nn.Module):
    """Multi-head self-attention (`query`/`key`/`value`/`output` Linears); eager or SDPA kernel per config."""

    def __init__(self, config: VMoEConfig):
        super().__init__()
        self.config = config
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.hidden_size // config.num_attention_heads
        self.scaling = self.attention_head_size**-0.5
        self.is_causal = False
        self.query = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.key = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.value = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.output = nn.Linear(config.hidden_size, config.hidden_size)
        self.attention_dropout = config.attention_probs_dropout_prob
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self, hidden_states: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns the attention output `[B, S, H]` and the attention probabilities (only when requested)."""
        shape = (*hidden_states.shape[:-1], self.num_attention_heads, self.attention_head_size)
        query, key, value = (
            proj(hidden_states).view(shape).transpose(1, 2) for proj in (self.query, self.key, self.value)
        )
        # Attention weights exist only in the eager kernel: use it when they are requested.
        implementation = "eager" if output_attentions else self.config._attn_implementation
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        context, weights = attention_interface(
            self, query, key, value, None,
            dropout=self.attention_dropout if self.training else 0.0, scaling=self.scaling,
        )
        output = self.dropout(self.output(context.reshape(hidden_states.shape)))
        return output, weights if output_attentions else None


# Copied from hf_moekd.models.dense_vit.modeling_dense_vit.DenseViTMLP with DenseViT->VMoE
class VMoEMLP(nn.Module):
    """Dense FFN `fc2(act(fc1(x)))` followed by dropout."""

    def __init__(self, config: VMoEConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.act(self.fc1(hidden_states))))


def top_k_routing(
    router_logits: torch.Tensor, top_k: int, normalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(weights, experts)`, both `[..., top_k]`: the top-k softmax probabilities (float32, renormalised to sum 1
    when `normalize`) and the chosen expert indices."""
    weights, experts = router_logits.float().softmax(-1).topk(top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, experts


def load_balancing_loss(router_logits: Sequence[torch.Tensor], top_k: int) -> torch.Tensor:
    """Mean over MoE blocks of `E * sum_e fraction_e * mean_prob_e` (all tokens count; images have no padding).

    `fraction_e`: fraction of tokens with e among their top-k experts; `mean_prob_e`: mean softmax probability of e.
    Perfectly balanced routing gives `top_k`; every token sent to the same k experts with probability 1/k gives E.
    """
    losses = []
    for logits in router_logits:
        num_experts = logits.shape[-1]
        probs = logits.float().softmax(-1).reshape(-1, num_experts)
        chosen = F.one_hot(probs.topk(top_k, dim=-1).indices, num_experts).sum(1).to(probs.dtype)  # [N, E] of 0/1
        losses.append(num_experts * (chosen.mean(0) * probs.mean(0)).sum())
    if not losses:
        raise ValueError("load_balancing_loss needs at least one router's logits.")
    return torch.stack(losses).mean()


class VMoERouter(nn.Module):
    """Gate logits `Linear(H, E, bias=False)`; in training the input is jittered by `U(1 - eps, 1 + eps)`."""

    def __init__(self, config: VMoEConfig):
        super().__init__()
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.jitter = config.router_jitter

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.training and self.jitter > 0:
            noise = torch.empty_like(hidden_states).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            hidden_states = hidden_states * noise
        return self.gate(hidden_states)


class VMoEExperts(nn.Module):
    """E FFN experts (`H -> I -> H`, like `mlp.fc1` / `mlp.fc2`) stored fused as in MiniMoE; top-k combination."""

    def __init__(self, config: VMoEConfig):
        super().__init__()
        inner, hidden = config.intermediate_size, config.hidden_size
        self.num_experts = config.num_experts
        self.w_in = nn.Parameter(torch.empty(config.num_experts, inner, hidden))
        self.b_in = nn.Parameter(torch.empty(config.num_experts, inner))
        self.w_out = nn.Parameter(torch.empty(config.num_experts, hidden, inner))
        self.b_out = nn.Parameter(torch.empty(config.num_experts, hidden))
        self.act = ACT2FN[config.hidden_act]

    # Copied from hf_moekd.models.minimoe.modeling_minimoe.MiniMoEExperts.expert_forward
    def expert_forward(self, expert: int, hidden_states: torch.Tensor) -> torch.Tensor:
        """One expert on `[tokens, H]`."""
        inner = self.act(F.linear(hidden_states, self.w_in[expert], self.b_in[expert]))
        return F.linear(inner, self.w_out[expert], self.b_out[expert])

    def forward(self, hidden_states: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """`hidden_states [N, H]`, `experts [N, k]`, `weights [N, k]` -> `sum_j weights[:, j] * expert_j(x)`."""
        top_k = experts.shape[-1]
        flat = experts.reshape(-1)  # slot s = token * k + j
        order = flat.argsort(stable=True)
        token = order // top_k
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        groups = hidden_states.index_select(0, token).split(counts)
        # Empty groups still run (on 0 rows) so every expert is in the graph (DDP needs no unused-parameter search).
        output = torch.cat([self.expert_forward(e, group) for e, group in enumerate(groups)])
        output = output * weights.reshape(-1).index_select(0, order).unsqueeze(-1).to(output.dtype)
        return torch.zeros_like(hidden_states).index_add(0, token, output)


class VMoESparseMLP(nn.Module):
    """Router + experts replacing a block's dense MLP; each token goes through its top-k experts, then dropout."""

    def __init__(self, config: VMoEConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.normalize = config.normalize_topk_weights
        self.router = VMoERouter(config)
        self.experts = VMoEExperts(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns `(output [B, S, H], router_logits [B, S, E])`."""
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        router_logits = self.router(flat)
        weights, experts = top_k_routing(router_logits, self.top_k, self.normalize)
        output = self.dropout(self.experts(flat, experts, weights))
        return output.view_as(hidden_states), router_logits.view(*hidden_states.shape[:-1], -1)


class VMoELayer(GradientCheckpointingLayer):
    """Pre-LayerNorm block (as `DenseViTLayer`) whose MLP is sparse when `is_moe`."""

    def __init__(self, config: VMoEConfig, is_moe: bool):
        super().__init__()
        self.is_moe = is_moe
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = VMoEAttention(config)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VMoESparseMLP(config) if is_moe else VMoEMLP(config)

    def forward(
        self, hidden_states: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Returns `(hidden_states, router_logits or None, attention_probs or None)`."""
        attention_output, weights = self.attention(self.layernorm_before(hidden_states), output_attentions)
        hidden_states = hidden_states + attention_output
        mlp_output, router_logits = self.mlp(self.layernorm_after(hidden_states)), None
        if self.is_moe:
            mlp_output, router_logits = mlp_output
        return hidden_states + mlp_output, router_logits, weights


class VMoEEncoder(nn.Module):
    def __init__(self, config: VMoEConfig):
        super().__init__()
        moe = set(config.moe_layers)
        self.layer = nn.ModuleList(VMoELayer(config, i in moe) for i in range(config.num_hidden_layers))

    def forward(
        self, hidden_states: torch.Tensor, output_attentions: bool = False, output_hidden_states: bool = False
    ) -> tuple[torch.Tensor, tuple | None, tuple, tuple | None]:
        all_hidden = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        router_logits = ()
        for layer in self.layer:
            # hidden_states positional: gradient checkpointing replays positional args
            hidden_states, logits, weights = layer(hidden_states, output_attentions=output_attentions)
            if logits is not None:
                router_logits += (logits,)
            if output_hidden_states:
                all_hidden += (hidden_states,)
            if output_attentions:
                all_attentions += (weights,)
        return hidden_states, all_hidden, router_logits, all_attentions


class VMoEPreTrainedModel(PreTrainedModel):
    config_class = VMoEConfig
    base_model_prefix = "vmoe"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["VMoEEmbeddings", "VMoELayer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, VMoEEmbeddings):
            init.trunc_normal_(module.position_embeddings, mean=0.0, std=self.config.initializer_range)
            init.trunc_normal_(module.cls_token, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, VMoEExperts):
            for weight, bias in ((module.w_in, module.b_in), (module.w_out, module.b_out)):
                init.normal_(weight, mean=0.0, std=self.config.initializer_range)
                init.zeros_(bias)


# Copied from hf_moekd.models.dense_vit.modeling_dense_vit.image_classification_loss with DenseViT->VMoE
def image_classification_loss(config: VMoEConfig, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """MSE when `num_labels == 1` (regression), cross-entropy for integer labels, BCE for float multi-label targets."""
    problem = config.problem_type
    if problem is None:
        if config.num_labels == 1:
            problem = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem = "single_label_classification"
        else:
            problem = "multi_label_classification"
    if problem == "regression":
        return F.mse_loss(logits.float().view(labels.shape), labels.float())
    if problem == "single_label_classification":
        return F.cross_entropy(logits.view(-1, config.num_labels).float(), labels.view(-1))
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())


class VMoEModel(VMoEPreTrainedModel):
    """The bare V-MoE encoder: embeddings, `encoder.layer` blocks (MoE in `config.moe_layers`), final LayerNorm."""

    # Copied from hf_moekd.models.dense_vit.modeling_dense_vit.DenseViTModel.__init__ with DenseViT->VMoE
    def __init__(self, config: VMoEConfig):
        super().__init__(config)
        self.embeddings = VMoEEmbeddings(config)
        self.encoder = VMoEEncoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    # Copied from hf_moekd.models.dense_vit.modeling_dense_vit.DenseViTModel.get_input_embeddings
    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embeddings

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> VMoEModelOutput | tuple:
        """`pixel_values` is `[batch, num_channels, image_size, image_size]`."""
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        return_dict = self.config.return_dict if return_dict is None else return_dict
        hidden_states, all_hidden, router_logits, all_attentions = self.encoder(
            self.embeddings(pixel_values), output_attentions, output_hidden_states
        )
        output = VMoEModelOutput(
            last_hidden_state=self.layernorm(hidden_states),
            hidden_states=all_hidden,
            attentions=all_attentions,
            router_logits=router_logits,
            aux_loss=load_balancing_loss(router_logits, self.config.num_experts_per_tok),
        )
        return output if return_dict else output.to_tuple()


class VMoEForImageClassification(VMoEPreTrainedModel):
    """V-MoE + linear classifier on the final CLS token; with labels, `loss` includes the balancing loss."""

    # Copied from hf_moekd.models.dense_vit.modeling_dense_vit.DenseViTForImageClassification.__init__ with DenseViT->VMoE,dense_vit->vmoe
    def __init__(self, config: VMoEConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.vmoe = VMoEModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> VMoEImageClassifierOutput | tuple:
        """With `labels`, `loss` = task loss + `router_aux_loss_coef * aux_loss`."""
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs = self.vmoe(
            pixel_values, output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        logits = self.classifier(outputs.last_hidden_state[:, 0])
        loss = None
        if labels is not None:
            loss = image_classification_loss(self.config, logits, labels)
            loss = loss + self.config.router_aux_loss_coef * outputs.aux_loss
        output = VMoEImageClassifierOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
            aux_loss=outputs.aux_loss,
        )
        return output if return_dict else output.to_tuple()


# ---- helpers for gathering a V-MoE into its dense twin ---------------------------------------------------------

def _moe_mlp(vmoe_model: VMoEPreTrainedModel, block: int) -> VMoESparseMLP:
    layers = vmoe_model.base_model.encoder.layer
    if not 0 <= block < len(layers) or not layers[block].is_moe:
        raise ValueError(f"Block {block} is not an MoE block; the MoE blocks are {vmoe_model.config.moe_layers}.")
    return layers[block].mlp


def vmoe_expert_weights(vmoe_model: VMoEPreTrainedModel, block: int) -> dict[str, torch.Tensor]:
    """The fused expert tensors of MoE block `block`: `w_in [E, I, H]`, `b_in [E, I]`, `w_out [E, H, I]`,
    `b_out [E, H]` (detached views of the parameters: clone before modifying)."""
    experts = _moe_mlp(vmoe_model, block).experts
    return {name: getattr(experts, name).detach() for name in ("w_in", "b_in", "w_out", "b_out")}


__all__ = [
    "VMoEForImageClassification",
    "VMoEImageClassifierOutput",
    "VMoEModel",
    "VMoEModelOutput",
    "VMoEPreTrainedModel",
    "load_balancing_loss",
    "top_k_routing",
    "vmoe_expert_weights",
]
