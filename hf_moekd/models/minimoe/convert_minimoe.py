"""Build a MiniMoE model from a dense BERT (the dense FFN becomes E experts that share most of their neurons)."""
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


DISTINCT_INITS = ("moefy", "noise")


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
    expert_shared_fraction: float = 2 / 3,
    seed: int = 0,
    distinct_init: str = "moefy",
    expert_noise_std: float = 0.01,
    **config_overrides,
) -> MiniMoEPreTrainedModel:
    """A MiniMoE model of the matching head type, initialised from `dense_model` (a BERT).

    Embeddings, attention, LayerNorms, pooler and classifier are copied exactly. Each FFN expert has the dense FFN's
    size (`intermediate.dense` -> `w_in/b_in`, `output.dense` -> `w_out/b_out`); its first
    `shared = round(expert_shared_fraction * intermediate_size)` neurons are copies of the dense FFN's first `shared`
    neurons in every expert. The other ("distinct") neurons follow `distinct_init`:

    * ``"moefy"`` (default; the official `MoELinear.moefy`, GeneZC/MiniMoE modules/modeling_moebert_gate.py): the
      dense neurons after the shared ones are partitioned among the experts, expert i taking dense neurons
      `shared + i, shared + i + E, ...`; its remaining slots are freshly initialised (normal, std
      `initializer_range`, zero bias), as the official student's experts are slices of a randomly initialised wide
      FFN. Distinct neurons of two experts are never copies of each other. The output bias is the dense one.
    * ``"noise"`` (earlier hf_moekd versions): every expert gets all dense neurons, the distinct ones plus Gaussian
      noise of std `expert_noise_std * std(dense weight)`: experts start as near-copies of the dense FFN.

    Routers are freshly initialised.

    With the config default `scale_expert_output_by_gate=True` (the paper) an expert's output is multiplied by its gate
    probability (about 1/E at init), so the converted model is NOT function-preserving; pass
    `scale_expert_output_by_gate=False` for a start that approximately reproduces the dense model (exactly with
    `expert_shared_fraction=1.0`). `seed` makes the result deterministic without touching the global RNG.
    """
    if distinct_init not in DISTINCT_INITS:
        raise ValueError(f"distinct_init must be one of {DISTINCT_INITS}, got {distinct_init!r}.")
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
