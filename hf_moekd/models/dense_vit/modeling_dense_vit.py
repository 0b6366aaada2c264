"""PyTorch DenseViT: a plain (dense) ViT image classifier (pre-LayerNorm blocks, CLS token, learned positions).

Parameter layout (the V-MoE -> DenseViT gathering code writes into these names):

* `dense_vit.embeddings.{cls_token [1, 1, H], position_embeddings [1, P + 1, H], patch_embeddings.projection}` (Conv2d)
* `dense_vit.encoder.layer.N.{layernorm_before, attention.{query, key, value, output}, layernorm_after, mlp.{fc1, fc2}}`
* `dense_vit.layernorm` (final LayerNorm), `classifier` (linear head on the CLS token)

Block: `x = x + attention(layernorm_before(x)); x = x + mlp(layernorm_after(x))`, dropout after `attention.output`
and after `mlp.fc2`. `hidden_states` are the embeddings then every block's output (before the final LayerNorm);
`last_hidden_state` is after it.

This file is copied next to saved checkpoints for `trust_remote_code=True` loading: it imports only torch,
transformers and `.configuration_dense_vit`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput, ImageClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel

from .configuration_dense_vit import DenseViTConfig


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


class DenseViTPatchEmbeddings(nn.Module):
    """Non-overlapping patches -> `[B, num_patches, H]` with a strided convolution."""

    def __init__(self, config: DenseViTConfig):
        super().__init__()
        self.projection = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projection(pixel_values).flatten(2).transpose(1, 2)


class DenseViTEmbeddings(nn.Module):
    """CLS token + patch embeddings + learned position embeddings, dropout."""

    def __init__(self, config: DenseViTConfig):
        super().__init__()
        self.config = config
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.patch_embeddings = DenseViTPatchEmbeddings(config)
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


class DenseViTAttention(nn.Module):
    """Multi-head self-attention (`query`/`key`/`value`/`output` Linears); eager or SDPA kernel per config."""

    def __init__(self, config: DenseViTConfig):
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


class DenseViTMLP(nn.Module):
    """Dense FFN `fc2(act(fc1(x)))` followed by dropout."""

    def __init__(self, config: DenseViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.act(self.fc1(hidden_states))))


class DenseViTLayer(GradientCheckpointingLayer):
    """Pre-LayerNorm transformer block."""

    def __init__(self, config: DenseViTConfig):
        super().__init__()
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = DenseViTAttention(config)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = DenseViTMLP(config)

    def forward(
        self, hidden_states: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns `(hidden_states, attention_probs or None)`."""
        attention_output, weights = self.attention(self.layernorm_before(hidden_states), output_attentions)
        hidden_states = hidden_states + attention_output
        return hidden_states + self.mlp(self.layernorm_after(hidden_states)), weights


class DenseViTEncoder(nn.Module):
    def __init__(self, config: DenseViTConfig):
        super().__init__()
        self.layer = nn.ModuleList(DenseViTLayer(config) for _ in range(config.num_hidden_layers))

    def forward(
        self, hidden_states: torch.Tensor, output_attentions: bool = False, output_hidden_states: bool = False
    ) -> tuple[torch.Tensor, tuple | None, tuple | None]:
        all_hidden = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.layer:
            # hidden_states positional: gradient checkpointing replays positional args
            hidden_states, weights = layer(hidden_states, output_attentions=output_attentions)
            if output_hidden_states:
                all_hidden += (hidden_states,)
            if output_attentions:
                all_attentions += (weights,)
        return hidden_states, all_hidden, all_attentions


class DenseViTPreTrainedModel(PreTrainedModel):
    config_class = DenseViTConfig
    base_model_prefix = "dense_vit"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["DenseViTEmbeddings", "DenseViTLayer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, DenseViTEmbeddings):
            init.trunc_normal_(module.position_embeddings, mean=0.0, std=self.config.initializer_range)
            init.trunc_normal_(module.cls_token, mean=0.0, std=self.config.initializer_range)


# Copied from hf_moekd.models.minimoe.modeling_minimoe._sequence_classification_loss with MiniMoE->DenseViT,_sequence->image
def image_classification_loss(config: DenseViTConfig, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
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


class DenseViTModel(DenseViTPreTrainedModel):
    """The bare DenseViT encoder: embeddings, `encoder.layer` blocks, final LayerNorm."""

    def __init__(self, config: DenseViTConfig):
        super().__init__(config)
        self.embeddings = DenseViTEmbeddings(config)
        self.encoder = DenseViTEncoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embeddings

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutput | tuple:
        """`pixel_values` is `[batch, num_channels, image_size, image_size]`."""
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        return_dict = self.config.return_dict if return_dict is None else return_dict
        hidden_states, all_hidden, all_attentions = self.encoder(
            self.embeddings(pixel_values), output_attentions, output_hidden_states
        )
        output = BaseModelOutput(
            last_hidden_state=self.layernorm(hidden_states), hidden_states=all_hidden, attentions=all_attentions
        )
        return output if return_dict else output.to_tuple()


class DenseViTForImageClassification(DenseViTPreTrainedModel):
    """DenseViT + linear classifier on the final CLS token (MSE when num_labels == 1, else cross-entropy)."""

    def __init__(self, config: DenseViTConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.dense_vit = DenseViTModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> ImageClassifierOutput | tuple:
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs = self.dense_vit(
            pixel_values, output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        logits = self.classifier(outputs.last_hidden_state[:, 0])
        loss = image_classification_loss(self.config, logits, labels) if labels is not None else None
        output = ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
        return output if return_dict else output.to_tuple()


__all__ = [
    "DenseViTForImageClassification",
    "DenseViTModel",
    "DenseViTPreTrainedModel",
    "image_classification_loss",
]
