"""PyTorch MiniMoE: a BERT-like encoder with top-1 Mixture-of-Experts FFN (and optionally attention) layers.

Reference: "Lifting the Curse of Capacity Gap in Distilling Language Models" (Zhang et al., ACL 2023).

Design (see `MiniMoEConfig` for the knobs):

* Parameter names follow BERT (`embeddings.*`, `encoder.layer.N.attention.self.{query,key,value}`,
  `attention.output.{dense,LayerNorm}`, `output.LayerNorm`, `pooler.dense`, `classifier`), so dense BERT weights copy
  over by name; only the FFN differs (`encoder.layer.N.ffn.router.gate`, `encoder.layer.N.ffn.experts.*`).
* Router: `gate = Linear(hidden, E)` with a bias and PyTorch's default Linear init, as the official `GateLinear`
  (`router_bias=False` / `router_init="normal"` for the earlier bias-free, N(0, initializer_range) router); in
  training only, uniform noise `U(-eps, eps)` is added to the logits (as the official code;
  `router_noise_type="multiplicative"` multiplies by `U(1 - eps, 1 + eps)`); softmax; top-1. The returned
  `router_logits` are the (noisy) logits used for routing, so the balancing loss can be recomputed from them exactly.
* FFN experts are stored fused (`w_in [E, I, H]`, `b_in [E, I]`, `w_out [E, H, I]`, `b_out [E, H]`); tokens are
  grouped per expert, so each token goes through exactly one expert (the FLOPs of one dense FFN, plus the router).
* Attention experts (`num_attention_experts = A > 1`): expert `a` is head group `a` (heads `a*H/A .. (a+1)*H/A - 1`)
  of one shared multi-head attention. Q/K/V are computed for all heads (every token needs the keys/values of every
  head group), a top-1 router on the block input picks each token's group, the other groups' context vectors of that
  token are zeroed, the kept ones scaled by the gate probability, then the output projection. This partitions the
  attention capacity per token; it does not save attention FLOPs.
* `scale_expert_output_by_gate` (default True, as in the paper) multiplies the expert output (before dropout,
  residual and LayerNorm) by its gate probability. With False and identical experts, MiniMoE equals the dense model.
* `aux_loss` = mean over all routers (FFN routers of every layer, then attention routers if A > 1) of
  `E * sum_e mean_prob_e * token_fraction_e` over every token of the batch, padding included, as the official
  `feed_forward` (`router_aux_loss_tokens="real"`: only tokens with attention_mask 1).

This file is copied next to saved checkpoints for `trust_remote_code=True` loading: it imports only torch,
transformers and `.configuration_minimoe`.
"""

from __future__ import annotations

import math
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

from .configuration_minimoe import MiniMoEConfig


@dataclass
class MiniMoEModelOutput(ModelOutput):
    """Base model output. `router_logits[i]` is layer i's FFN router logits `[batch, seq, num_ffn_experts]` (None when
    num_ffn_experts == 1); `attention_router_logits` likewise for attention experts (None when A == 1); `aux_loss` is
    the load-balancing loss (0 when there is no router)."""

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None
    attention_router_logits: tuple[torch.FloatTensor, ...] | None = None
    aux_loss: torch.FloatTensor | None = None


@dataclass
class MiniMoEClassifierOutput(ModelOutput):
    """Sequence/token classification output; `loss` already includes `router_aux_loss_coef * aux_loss`."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None
    attention_router_logits: tuple[torch.FloatTensor, ...] | None = None
    aux_loss: torch.FloatTensor | None = None


def load_balancing_loss(
    router_logits: Sequence[torch.Tensor], attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over routers of `E * sum_e mean_prob_e * token_fraction_e`, over tokens with `attention_mask` = 1.

    Each entry of `router_logits` is `[batch, seq, E]`; `attention_mask` is `[batch, seq]` (None = every token, as
    the official code, which averages over the whole padded batch: GeneZC/MiniMoE modules/modeling_moebert_gate.py
    lines 456 and 472-476; the models pass None unless `router_aux_loss_tokens="real"`).
    The loss is 1 for perfectly balanced routing and E when every token goes to one expert with probability 1.
    """
    losses = []
    for logits in router_logits:
        num_experts = logits.shape[-1]
        probs = logits.float().softmax(-1).reshape(-1, num_experts)
        chosen = F.one_hot(probs.argmax(-1), num_experts).to(probs.dtype)
        if attention_mask is None:
            weights = probs.new_full((probs.shape[0], 1), 1.0 / probs.shape[0])
        else:
            weights = attention_mask.reshape(-1, 1).to(probs.dtype)
            weights = weights / weights.sum().clamp(min=1.0)
        mean_prob, token_fraction = (probs * weights).sum(0), (chosen * weights).sum(0)
        losses.append(num_experts * (mean_prob * token_fraction).sum())
    if not losses:
        raise ValueError("load_balancing_loss needs at least one router's logits.")
    return torch.stack(losses).mean()


class MiniMoEEmbeddings(nn.Module):
    """Word + position + token type embeddings, LayerNorm, dropout (as BERT)."""

    def __init__(self, config: MiniMoEConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.position_ids = nn.Buffer(torch.arange(config.max_position_embeddings).expand((1, -1)), persistent=False)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
    ) -> torch.Tensor:
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        seq_length = inputs_embeds.shape[1]
        if position_ids is None:
            position_ids = self.position_ids[:, :seq_length]
        if token_type_ids is None:
            token_type_ids = torch.zeros(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
        embeddings = inputs_embeds + self.token_type_embeddings(token_type_ids) + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(embeddings))


class MiniMoEGate(nn.Linear):
    """The router's gate `Linear(hidden, E)`; its own class so `_init_weights` can give it the official init."""


class MiniMoERouter(nn.Module):
    """Top-1 router: gate logits (plus uniform noise `U(-eps, eps)` in training, or times `U(1 - eps, 1 + eps)` with
    `noise_type="multiplicative"`), softmax, argmax."""

    def __init__(self, hidden_size: int, num_experts: int, noise: float, noise_type: str = "additive",
                 bias: bool = True):
        super().__init__()
        self.gate = MiniMoEGate(hidden_size, num_experts, bias=bias)
        self.noise = noise
        self.noise_type = noise_type

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns `(logits, top_prob, expert_index)`; logits `[..., E]`, the others `[...]`."""
        logits = self.gate(hidden_states)
        if self.training and self.noise > 0:
            if self.noise_type == "additive":
                logits = logits + torch.empty_like(logits).uniform_(-self.noise, self.noise)
            else:
                logits = logits * torch.empty_like(logits).uniform_(1.0 - self.noise, 1.0 + self.noise)
        top_prob, expert_index = logits.float().softmax(-1).max(-1)
        return logits, top_prob, expert_index


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


class MiniMoESelfAttention(nn.Module):
    """Multi-head self-attention projections and kernel (eager or SDPA via `config._attn_implementation`)."""

    def __init__(self, config: MiniMoEConfig):
        super().__init__()
        self.config = config
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.hidden_size // config.num_attention_heads
        self.scaling = self.attention_head_size**-0.5
        self.is_causal = False
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns the per-head context `[B, S, heads, head_size]` and the attention probabilities (eager only)."""
        shape = (*hidden_states.shape[:-1], self.num_attention_heads, self.attention_head_size)
        query, key, value = (
            proj(hidden_states).view(shape).transpose(1, 2) for proj in (self.query, self.key, self.value)
        )
        # Attention weights exist only in the eager kernel: use it when they are requested.
        implementation = "eager" if output_attentions else self.config._attn_implementation
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        context, weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.dropout.p if self.training else 0.0,
            scaling=self.scaling,
        )
        return context, weights


class MiniMoESelfOutput(nn.Module):
    def __init__(self, config: MiniMoEConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class MiniMoEAttention(nn.Module):
    """Self-attention + output projection; with `num_attention_experts` > 1 each token keeps one routed head group."""

    def __init__(self, config: MiniMoEConfig):
        super().__init__()
        self.self = MiniMoESelfAttention(config)
        self.output = MiniMoESelfOutput(config)
        self.num_experts = config.num_attention_experts
        self.scale_by_gate = config.scale_expert_output_by_gate
        self.router = (
            MiniMoERouter(config.hidden_size, self.num_experts, config.router_noise_eps, config.router_noise_type,
                          config.router_bias)
            if self.num_experts > 1
            else None
        )

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Returns `(output, attention_probs or None, router_logits or None)`."""
        context, weights = self.self(hidden_states, attention_mask, output_attentions)
        router_logits = None
        if self.router is not None:
            router_logits, top_prob, expert_index = self.router(hidden_states)
            heads_per_expert = context.shape[2] // self.num_experts
            keep = F.one_hot(expert_index, self.num_experts).to(context.dtype)
            if self.scale_by_gate:
                keep = keep * top_prob.unsqueeze(-1).to(context.dtype)
            context = context * keep.repeat_interleave(heads_per_expert, dim=-1).unsqueeze(-1)
        output = self.output(context.reshape(hidden_states.shape), hidden_states)
        return output, weights, router_logits


class MiniMoEExperts(nn.Module):
    """E FFN experts (each `H -> I -> H`, like BERT's intermediate/output dense) stored as fused weights.

    How the routed rows are computed follows `config._experts_implementation` (transformers' `experts_implementation`
    argument of `from_pretrained`): "eager" one matmul pair per expert on its rows; "batched_mm" one batched matmul
    over the experts with their rows padded to the largest group; "grouped_mm" `torch.nn.functional.grouped_mm` over
    the rows sorted by expert (widths whose rows are not 16-byte aligned use "eager"). All give the same result (benchmarks/minimoe_latency.py times them)."""

    def __init__(self, config: MiniMoEConfig, num_experts: int | None = None):
        super().__init__()
        num_experts = num_experts or config.num_ffn_experts
        inner, hidden = config.intermediate_size, config.hidden_size
        self.config = config
        self.num_experts = num_experts
        self.w_in = nn.Parameter(torch.empty(num_experts, inner, hidden))
        self.b_in = nn.Parameter(torch.empty(num_experts, inner))
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden, inner))
        self.b_out = nn.Parameter(torch.empty(num_experts, hidden))
        self.act = ACT2FN[config.hidden_act]

    def expert_forward(self, expert: int, hidden_states: torch.Tensor) -> torch.Tensor:
        """One expert on `[tokens, H]`."""
        inner = self.act(F.linear(hidden_states, self.w_in[expert], self.b_in[expert]))
        return F.linear(inner, self.w_out[expert], self.b_out[expert])

    def dispatch(
        self, hidden_states: torch.Tensor, expert_index: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """The rows of `hidden_states [N, H]` grouped by expert (one group per expert, possibly empty) and the
        row order of the grouping."""
        order = expert_index.argsort(stable=True)
        counts = torch.bincount(expert_index, minlength=self.num_experts).tolist()
        return hidden_states.index_select(0, order).split(counts), order

    def forward(self, hidden_states: torch.Tensor, expert_index: torch.Tensor | None) -> torch.Tensor:
        """`hidden_states [N, H]`, `expert_index [N]` -> `[N, H]`, each row through its own expert only."""
        if self.num_experts == 1:
            return self.expert_forward(0, hidden_states)
        implementation = getattr(self.config, "_experts_implementation", None) or "eager"
        if implementation == "batched_mm":
            return self._batched(hidden_states, expert_index)
        if implementation == "grouped_mm" and all(d * self.w_in.element_size() % 16 == 0 for d in self.w_in.shape[1:]):
            return self._grouped(hidden_states, expert_index)  # grouped_mm needs 16-byte aligned rows
        groups, order = self.dispatch(hidden_states, expert_index)
        # Empty groups still run (on 0 rows) so every expert is in the graph (DDP needs no unused-parameter search).
        output = torch.cat([self.expert_forward(e, group) for e, group in enumerate(groups)])
        return output.index_select(0, order.argsort())

    def _batched(self, hidden_states: torch.Tensor, expert_index: torch.Tensor) -> torch.Tensor:
        """All experts in one `baddbmm` pair on `[E, max rows, H]` (rows padded with zeros)."""
        order = expert_index.argsort(stable=True)
        counts = torch.bincount(expert_index, minlength=self.num_experts)
        sorted_experts = expert_index.index_select(0, order)
        slot = torch.arange(len(order), device=order.device) - (counts.cumsum(0) - counts).index_select(0, sorted_experts)
        padded = hidden_states.new_zeros(self.num_experts, int(counts.max()), hidden_states.shape[-1])
        padded = padded.index_put((sorted_experts, slot), hidden_states.index_select(0, order))
        inner = self.act(torch.baddbmm(self.b_in.unsqueeze(1), padded, self.w_in.mT))
        out = torch.baddbmm(self.b_out.unsqueeze(1), inner, self.w_out.mT)[sorted_experts, slot]
        return torch.empty_like(out).index_copy(0, order, out)

    def _grouped(self, hidden_states: torch.Tensor, expert_index: torch.Tensor) -> torch.Tensor:
        """`grouped_mm` over the rows sorted by expert (offsets = cumulative group sizes)."""
        order = expert_index.argsort(stable=True)
        sorted_experts = expert_index.index_select(0, order)
        offsets = torch.bincount(expert_index, minlength=self.num_experts).cumsum(0).to(torch.int32)
        rows = hidden_states.index_select(0, order)
        inner = F.grouped_mm(rows, self.w_in.mT, offs=offsets) + self.b_in.index_select(0, sorted_experts)
        out = F.grouped_mm(self.act(inner), self.w_out.mT, offs=offsets) + self.b_out.index_select(0, sorted_experts)
        return torch.empty_like(out).index_copy(0, order, out)


class MiniMoESparseFFN(nn.Module):
    """Router + experts: each token goes through its top-1 expert, scaled by the gate probability (optional)."""

    def __init__(self, config: MiniMoEConfig):
        super().__init__()
        self.num_experts = config.num_ffn_experts
        self.scale_by_gate = config.scale_expert_output_by_gate
        self.router = (
            MiniMoERouter(config.hidden_size, self.num_experts, config.router_noise_eps, config.router_noise_type,
                          config.router_bias)
            if self.num_experts > 1
            else None
        )
        self.experts = MiniMoEExperts(config)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns `(output [B, S, H], router_logits [B, S, E] or None)`."""
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        if self.router is None:
            return self.experts(flat, None).view_as(hidden_states), None
        router_logits, top_prob, expert_index = self.router(flat)
        output = self.experts(flat, expert_index)
        if self.scale_by_gate:
            output = output * top_prob.unsqueeze(-1).to(output.dtype)
        return output.view_as(hidden_states), router_logits.view(*hidden_states.shape[:-1], -1)


class MiniMoEOutput(nn.Module):
    """Dropout, residual and LayerNorm after the FFN (BERT's `output` without its dense, which lives in the experts)."""

    def __init__(self, config: MiniMoEConfig):
        super().__init__()
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(hidden_states) + input_tensor)


class MiniMoELayer(GradientCheckpointingLayer):
    def __init__(self, config: MiniMoEConfig):
        super().__init__()
        self.attention = MiniMoEAttention(config)
        self.ffn = MiniMoESparseFFN(config)
        self.output = MiniMoEOutput(config)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Returns `(hidden_states, ffn_router_logits, attention_router_logits, attention_probs)`."""
        attention_output, attention_probs, attention_router_logits = self.attention(
            hidden_states, attention_mask, output_attentions
        )
        ffn_output, ffn_router_logits = self.ffn(attention_output)
        return self.output(ffn_output, attention_output), ffn_router_logits, attention_router_logits, attention_probs


class MiniMoEEncoder(nn.Module):
    def __init__(self, config: MiniMoEConfig):
        super().__init__()
        self.layer = nn.ModuleList(MiniMoELayer(config) for _ in range(config.num_hidden_layers))

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, tuple | None, tuple, tuple, tuple | None]:
        all_hidden = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        ffn_logits, attention_logits = (), ()
        for layer in self.layer:
            # hidden_states / mask positional: gradient checkpointing replays positional args
            hidden_states, ffn, attention, probs = layer(
                hidden_states, attention_mask, output_attentions=output_attentions
            )
            if ffn is not None:
                ffn_logits += (ffn,)
            if attention is not None:
                attention_logits += (attention,)
            if output_hidden_states:
                all_hidden += (hidden_states,)
            if output_attentions:
                all_attentions += (probs,)
        return hidden_states, all_hidden, ffn_logits, attention_logits, all_attentions


class MiniMoEPooler(nn.Module):
    def __init__(self, config: MiniMoEConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(hidden_states[:, 0]))


class MiniMoEPreTrainedModel(PreTrainedModel):
    config_class = MiniMoEConfig
    base_model_prefix = "minimoe"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["MiniMoEEmbeddings", "MiniMoELayer"]

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        return True  # MiniMoEExperts reads config._experts_implementation: eager, batched_mm, grouped_mm

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        """`experts_implementation` of `from_pretrained`: "eager" (default, the fastest on CPU here: see
        benchmarks/minimoe_latency.py), "batched_mm" or "grouped_mm"."""
        if requested_experts not in (None, "eager", "batched_mm", "grouped_mm"):
            raise ValueError(f'experts_implementation={requested_experts!r} is not supported by MiniMoE: use "eager", '
                             '"batched_mm" or "grouped_mm"')
        return requested_experts or "eager"

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, MiniMoEEmbeddings):
            init.copy_(module.position_ids, torch.arange(module.position_ids.shape[-1]).expand((1, -1)))
        elif isinstance(module, MiniMoEGate):  # super() gave it the BERT init (normal weight, zero bias)
            weight, bias = module.weight, module.bias
            if bias is not None and getattr(weight, "_is_hf_initialized", False):
                init.zeros_(bias)  # a checkpoint saved without a router bias: zero keeps its function
            elif self.config.router_init == "uniform":
                # Official GateLinear.moefy -> nn.Linear.reset_parameters() (GeneZC/MiniMoE
                # modules/modeling_moebert_gate.py line 343): weight and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
                bound = 1.0 / math.sqrt(weight.shape[1])
                init.uniform_(weight, -bound, bound)
                if bias is not None:
                    init.uniform_(bias, -bound, bound)
        elif isinstance(module, MiniMoEExperts):
            shared = round(self.config.expert_shared_fraction * module.w_in.shape[1])
            # (parameter, neuron dim): the first `shared` neurons are copied from expert 0 to every expert.
            for param, dim in ((module.w_in, 1), (module.b_in, 1), (module.w_out, 2), (module.b_out, None)):
                if getattr(param, "_is_hf_initialized", False):  # loaded from a checkpoint
                    continue
                if param.dim() == 2:
                    init.zeros_(param)
                else:
                    init.normal_(param, mean=0.0, std=self.config.initializer_range)
                if dim is not None and shared:
                    block = param.narrow(dim, 0, shared)
                    block.copy_(block[:1].expand_as(block).clone())


class MiniMoEModel(MiniMoEPreTrainedModel):
    """The bare MiniMoE encoder (embeddings, MoE blocks in `encoder.layer`, optional BERT pooler)."""

    def __init__(self, config: MiniMoEConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        self.embeddings = MiniMoEEmbeddings(config)
        self.encoder = MiniMoEEncoder(config)
        self.pooler = MiniMoEPooler(config) if add_pooling_layer else None
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> MiniMoEModelOutput | tuple:
        """`attention_mask` is `[batch, seq]` with 1 for real tokens and 0 for padding."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(
                f"attention_mask must be [batch, seq] (1 = token, 0 = padding), got {tuple(attention_mask.shape)}."
            )

        hidden_states = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds)
        block_mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        hidden_states, all_hidden, ffn_logits, attention_logits, all_attentions = self.encoder(
            hidden_states, block_mask, output_attentions, output_hidden_states
        )
        routers = ffn_logits + attention_logits
        if routers:
            tokens = attention_mask if self.config.router_aux_loss_tokens == "real" else None
            aux_loss = load_balancing_loss(routers, tokens)
        else:
            aux_loss = hidden_states.new_zeros((), dtype=torch.float32)
        output = MiniMoEModelOutput(
            last_hidden_state=hidden_states,
            pooler_output=self.pooler(hidden_states) if self.pooler is not None else None,
            hidden_states=all_hidden,
            attentions=all_attentions,
            router_logits=ffn_logits or None,
            attention_router_logits=attention_logits or None,
            aux_loss=aux_loss,
        )
        return output if return_dict else output.to_tuple()


def _sequence_classification_loss(config: MiniMoEConfig, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
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


class MiniMoEForSequenceClassification(MiniMoEPreTrainedModel):
    """MiniMoE + BERT pooler + linear classifier (MSE when num_labels == 1, cross-entropy for integer labels)."""

    def __init__(self, config: MiniMoEConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.minimoe = MiniMoEModel(config)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> MiniMoEClassifierOutput | tuple:
        """With `labels`, `loss` = task loss + `router_aux_loss_coef * aux_loss`."""
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs = self.minimoe(
            input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=True,
        )
        logits = self.classifier(self.dropout(outputs.pooler_output))
        loss = None
        if labels is not None:
            loss = _sequence_classification_loss(self.config, logits, labels)
            loss = loss + self.config.router_aux_loss_coef * outputs.aux_loss
        output = MiniMoEClassifierOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
            attention_router_logits=outputs.attention_router_logits,
            aux_loss=outputs.aux_loss,
        )
        return output if return_dict else output.to_tuple()


class MiniMoEForTokenClassification(MiniMoEPreTrainedModel):
    """MiniMoE + per-token linear classifier (cross-entropy ignoring label -100)."""

    def __init__(self, config: MiniMoEConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.minimoe = MiniMoEModel(config, add_pooling_layer=False)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> MiniMoEClassifierOutput | tuple:
        """With `labels` (`[batch, seq]`, -100 = ignored), `loss` = CE + `router_aux_loss_coef * aux_loss`."""
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs = self.minimoe(
            input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=True,
        )
        logits = self.classifier(self.dropout(outputs.last_hidden_state))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, self.num_labels).float(), labels.view(-1), ignore_index=-100)
            loss = loss + self.config.router_aux_loss_coef * outputs.aux_loss
        output = MiniMoEClassifierOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
            attention_router_logits=outputs.attention_router_logits,
            aux_loss=outputs.aux_loss,
        )
        return output if return_dict else output.to_tuple()


__all__ = [
    "MiniMoEClassifierOutput",
    "MiniMoEForSequenceClassification",
    "MiniMoEForTokenClassification",
    "MiniMoEModel",
    "MiniMoEModelOutput",
    "MiniMoEPreTrainedModel",
    "load_balancing_loss",
]
