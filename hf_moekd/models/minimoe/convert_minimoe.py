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


@torch.no_grad()
def minimoe_from_dense(
    dense_model: PreTrainedModel,
    num_ffn_experts: int = 4,
    expert_shared_fraction: float = 2 / 3,
    seed: int = 0,
    expert_noise_std: float = 0.01,
    **config_overrides,
) -> MiniMoEPreTrainedModel:
    """A MiniMoE model of the matching head type, initialised from `dense_model` (a BERT).

    Embeddings, attention, LayerNorms, pooler and classifier are copied exactly. Every FFN expert starts from the dense
    FFN (`intermediate.dense` -> `w_in/b_in`, `output.dense` -> `w_out/b_out`): its first
    `round(expert_shared_fraction * intermediate_size)` neurons are exact copies (shared by all experts); the other
    neurons are the dense ones plus independent Gaussian noise of std `expert_noise_std * std(dense weight)` per expert
    (biases exact), so experts differ while each still approximates the dense FFN. Routers are freshly initialised.

    With the config default `scale_expert_output_by_gate=True` (the paper) an expert's output is multiplied by its gate
    probability (about 1/E at init), so the converted model is NOT function-preserving; pass
    `scale_expert_output_by_gate=False` for a start that approximately reproduces the dense model (exactly with
    `expert_shared_fraction=1.0`). `seed` makes the result deterministic without touching the global RNG.
    """
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
            new_in, new_out = w_in.clone(), w_out.clone()
            if shared < w_in.shape[0] and expert_noise_std > 0:
                noise_in = torch.randn(new_in[shared:].shape, generator=generator)
                noise_out = torch.randn(new_out[:, shared:].shape, generator=generator)
                new_in[shared:] += expert_noise_std * w_in.std() * noise_in
                new_out[:, shared:] += expert_noise_std * w_out.std() * noise_out
            experts.w_in[e].copy_(new_in)
            experts.b_in[e].copy_(b_in)
            experts.w_out[e].copy_(new_out)
            experts.b_out[e].copy_(b_out)

    param = next(dense_model.parameters())
    return model.to(device=param.device, dtype=param.dtype).train(dense_model.training)


__all__ = ["minimoe_from_dense"]
