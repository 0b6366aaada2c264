"""Build a MiniMoE model from a dense BERT: by default every expert computes the dense FFN's function (the MoE
layer's output equals the dense FFN's at step 0); the official `moefy` partition and near-copies as options."""
from __future__ import annotations

import torch
from transformers import (
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    PreTrainedModel,
)

from .configuration_minimoe import MiniMoEConfig
from .modeling_minimoe import (
    MiniMoEForSequenceClassification,
    MiniMoEForTokenClassification,
    MiniMoEModel,
    MiniMoEPreTrainedModel,
)

_TARGETS = (
    (BertForSequenceClassification, MiniMoEForSequenceClassification),
    (BertForTokenClassification, MiniMoEForTokenClassification),
    (BertModel, MiniMoEModel),
)


DISTINCT_INITS = ("copy", "moefy", "noise")


def _moefy_expert(w_in: torch.Tensor, b_in: torch.Tensor, w_out: torch.Tensor, shared: int, expert: int,
                  num_experts: int, std: float, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Expert `expert`'s (w_in, b_in, w_out): the shared dense neurons, its share of the other dense neurons
    (`shared + expert :: num_experts`), then fresh neurons up to the dense FFN's size."""
    size = w_in.shape[0]
    own = torch.tensor(range(shared + expert, size, num_experts), dtype=torch.long)
    rows = torch.cat([torch.arange(shared), own])
    fresh = size - len(rows)
    new_in = torch.cat([w_in[rows], torch.randn(fresh, w_in.shape[1], generator=generator) * std])
    new_bin = torch.cat([b_in[rows], torch.zeros(fresh)])
    new_out = torch.cat([w_out[:, rows], torch.randn(w_out.shape[0], fresh, generator=generator) * std], dim=1)
    return new_in, new_bin, new_out


@torch.no_grad()
def minimoe_from_dense(
    dense_model: PreTrainedModel,
    num_ffn_experts: int = 4,
    expert_shared_fraction: float | None = None,
    seed: int = 0,
    distinct_init: str = "copy",
    expert_noise_std: float = 0.01,
    **config_overrides,
) -> MiniMoEPreTrainedModel:
    """A MiniMoE model of the matching head type, initialised from `dense_model` (a BERT).

    Embeddings, attention, LayerNorms, pooler and classifier are copied exactly. Each FFN expert has the dense FFN's
    size (`intermediate.dense` -> `w_in/b_in`, `output.dense` -> `w_out/b_out`). `distinct_init` says how:

    * ``"copy"`` (default): the converted model computes the dense model's function at step 0. Every expert is the
      dense FFN with its output layer (`w_out`, `b_out`) multiplied by E, and every router starts at zero weight and
      bias, so each token's gate probability is exactly 1/E and the gated expert output `(1/E) * E * FFN(x)` is the
      dense FFN's output (`scale_expert_output_by_gate=False`: no factor E, the gate is not applied). An exact
      *split* of the dense neurons among top-1 experts cannot do this: a token runs one expert only, so it would
      lose the other experts' neurons. Exact in eval mode and whenever the router noise is 0; in training the
      additive router noise `U(-eps, eps)` moves the top gate probability within `[1/E, e^(2 eps) / (e^(2 eps) + E -
      1)]` (at most 1.16x the dense output at eps 0.1, E 4) until the router learns. The experts are identical at
      step 0 and diverge as the router (which gets gradient through the gate probability and the balancing loss)
      sends them different tokens. With attention experts (`num_attention_experts > 1`) the attention is NOT
      preserved: a token keeps one head group and the other groups' context is dropped, which no choice of weights
      undoes for every input; the FFN part still is. `expert_shared_fraction` must be None or 1.0. Training
      dynamics are not the dense student's: an optimiser step of Adam's size on the E-times larger output weights
      moves the gated output about 1/E as far as the same step in the dense FFN does.
    * ``"moefy"`` (the official `MoELinear.moefy`, GeneZC/MiniMoE modules/modeling_moebert_gate.py lines 121-165,
      the start of the official random-init students): the first `shared = round(expert_shared_fraction *
      intermediate_size)` dense neurons (default fraction 2/3) are copied into every expert, the dense neurons after
      them are partitioned among the experts, expert i taking dense neurons `shared + i, shared + i + E, ...`; its
      remaining slots are freshly initialised (normal, std `initializer_range`, zero bias), as the official
      student's experts are slices of a randomly initialised wide FFN. Distinct neurons of two experts are never
      copies of each other. The output bias is the dense one. The routers get the config's fresh init (official:
      `router_init="uniform"`). On all-MiniLM-L6-v2's blocks 0, 2, 4 the MoE FFN output starts at 0.30-0.35x the
      dense FFN's norm (cosine 0.84-0.88 on a few sentences; issue 29 reports 0.36x / 0.74): NOT function-preserving.
    * ``"noise"`` (earlier hf_moekd versions): every expert gets all dense neurons, the neurons after the first
      `shared` plus Gaussian noise of std `expert_noise_std * std(dense weight)`: experts start as near-copies of
      the dense FFN, still scaled by the gate probability (about 1/E) unless `scale_expert_output_by_gate=False`.

    `seed` makes the result deterministic without touching the global RNG.
    """
    if distinct_init not in DISTINCT_INITS:
        raise ValueError(f"distinct_init must be one of {DISTINCT_INITS}, got {distinct_init!r}.")
    if distinct_init == "copy":
        if expert_shared_fraction not in (None, 1.0):
            raise ValueError("distinct_init='copy' makes every expert the whole dense FFN: expert_shared_fraction must "
                             f"be None or 1.0, got {expert_shared_fraction} (distinct_init='moefy' partitions).")
        expert_shared_fraction = 1.0
    elif expert_shared_fraction is None:
        expert_shared_fraction = 2 / 3
    target = next((moe for dense, moe in _TARGETS if isinstance(dense_model, dense)), None)
    if target is None:
        raise TypeError(
            "minimoe_from_dense supports BertModel, BertForSequenceClassification and BertForTokenClassification, "
            f"got {type(dense_model).__name__}."
        )
    config = MiniMoEConfig.from_dense(
        dense_model.config, num_ffn_experts=num_ffn_experts, expert_shared_fraction=expert_shared_fraction,
        **config_overrides,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if target is MiniMoEModel:
            model = MiniMoEModel(config, add_pooling_layer=dense_model.pooler is not None)
        else:
            model = target(config)
    generator = torch.Generator().manual_seed(seed)

    # Dense parameter names, with the dense base-model prefix ("bert.") replaced by ours ("minimoe.").
    dense_prefix = "" if dense_model.base_model is dense_model else dense_model.base_model_prefix + "."
    moe_prefix = "" if model.base_model is model else model.base_model_prefix + "."
    dense = {
        (moe_prefix + name[len(dense_prefix):] if name.startswith(dense_prefix) else name): param.detach().cpu()
        for name, param in dense_model.state_dict().items()
    }

    copied = set()
    for name, param in model.named_parameters():
        if ".ffn." in name:
            continue
        if name not in dense or dense[name].shape != param.shape:
            found = "missing" if name not in dense else f"shape {tuple(dense[name].shape)}"
            raise ValueError(f"Cannot copy {name} {tuple(param.shape)} from the dense model ({found}); "
                             "do not override architecture fields (hidden_size, vocab_size, ...) when converting.")
        param.copy_(dense[name])
        copied.add(name)

    for i, layer in enumerate(model.base_model.encoder.layer):
        base = f"{moe_prefix}encoder.layer.{i}."
        w_in, b_in = dense[base + "intermediate.dense.weight"], dense[base + "intermediate.dense.bias"]
        w_out, b_out = dense[base + "output.dense.weight"], dense[base + "output.dense.bias"]
        experts = layer.ffn.experts
        if experts.w_in.shape[1:] != w_in.shape:
            raise ValueError(
                f"Expert shape {tuple(experts.w_in.shape[1:])} != dense FFN {tuple(w_in.shape)} in layer {i}."
            )
        shared = round(expert_shared_fraction * w_in.shape[0])
        if distinct_init == "copy":
            scale = float(num_ffn_experts) if config.scale_expert_output_by_gate else 1.0
            experts.w_in.copy_(w_in.expand_as(experts.w_in))
            experts.b_in.copy_(b_in.expand_as(experts.b_in))
            experts.w_out.copy_((w_out * scale).expand_as(experts.w_out))
            experts.b_out.copy_((b_out * scale).expand_as(experts.b_out))
            routers = [layer.ffn.router] if layer.ffn.router is not None else []
            for router in routers:  # uniform gate probabilities 1/E for every token
                router.gate.weight.zero_()
                if router.gate.bias is not None:
                    router.gate.bias.zero_()
            continue
        for e in range(num_ffn_experts):
            if distinct_init == "moefy":
                new_in, new_bin, new_out = _moefy_expert(w_in, b_in, w_out, shared, e, num_ffn_experts,
                                                         config.initializer_range, generator)
            else:
                new_in, new_bin, new_out = w_in.clone(), b_in, w_out.clone()
                if shared < w_in.shape[0] and expert_noise_std > 0:
                    noise_in = torch.randn(new_in[shared:].shape, generator=generator)
                    noise_out = torch.randn(new_out[:, shared:].shape, generator=generator)
                    new_in[shared:] += expert_noise_std * w_in.std() * noise_in
                    new_out[:, shared:] += expert_noise_std * w_out.std() * noise_out
            experts.w_in[e].copy_(new_in)
            experts.b_in[e].copy_(new_bin)
            experts.w_out[e].copy_(new_out)
            experts.b_out[e].copy_(b_out)

    param = next(dense_model.parameters())
    return model.to(device=param.device, dtype=param.dtype).train(dense_model.training)


__all__ = ["minimoe_from_dense"]
