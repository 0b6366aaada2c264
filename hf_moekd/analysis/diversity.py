"""How different the experts of each MoE layer are: mean pairwise cosine similarity of their outputs on the same
tokens, and of their flattened weights. 1 = identical (collapsed) experts; about 0 for independent random ones."""
from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..model_utils.experts import ExpertCall, find_experts, patch_experts
from ..mode.collapse import mean_pairwise_cosine
from ..mode.losses import mode_loss_per_example, real_tokens
from .batches import iterate_batches, to_device


@torch.no_grad()
def expert_weight_similarity(model: nn.Module) -> dict[str, float]:
    """Per MoE layer: mean pairwise cosine of the experts' flattened parameters (every parameter of the experts
    module whose first dimension is the expert index, concatenated)."""
    result = {}
    for name, adapter in find_experts(model).items():
        E = adapter.num_experts
        params = [p.reshape(E, -1) for p in adapter.module.parameters(recurse=False) if p.dim() and p.shape[0] == E]
        result[name] = float(mean_pairwise_cosine(torch.cat(params, dim=1)))
    return result


def _expert_calls(model: nn.Module, data: Any, record: str, batch_size: int, collate_fn: Callable | None,
                  max_batches: int | None, label_key: str) -> Iterator[tuple[list[ExpertCall], dict, int]]:
    """Run `model` in eval mode over `data`, yielding each batch's recorded expert calls, inputs and example count."""
    was_training = model.training
    model.eval()
    try:
        for batch in iterate_batches(data, batch_size, collate_fn, max_batches):
            inputs = to_device(batch, model)
            inputs.pop(label_key, None)
            with patch_experts(model, record=record) as calls:
                model(**inputs)
            yield calls, inputs, next(v for v in inputs.values() if isinstance(v, torch.Tensor)).shape[0]
    finally:
        model.train(was_training)


@torch.no_grad()
def expert_output_similarity(model: nn.Module, data: Any, batch_size: int = 64, collate_fn: Callable | None = None,
                             max_batches: int | None = None, label_key: str = "labels") -> dict[str, float]:
    """Per MoE layer: mean pairwise cosine of all E experts' outputs (before gate weighting) on each real token,
    averaged over the tokens of `data` (every expert runs on every token, as MoDE's 'all' variant)."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for calls, inputs, n_examples in _expert_calls(model, data, "all", batch_size, collate_fn, max_batches, label_key):
        for call in calls:
            mask = real_tokens(call.outputs.shape[0], n_examples, inputs.get("attention_mask")).reshape(-1)
            cos = mean_pairwise_cosine(call.outputs)[mask.to(call.outputs.device)]
            sums[call.layer] = sums.get(call.layer, 0.0) + float(cos.sum())
            counts[call.layer] = counts.get(call.layer, 0) + cos.numel()
    if not counts:
        raise ValueError("expert_output_similarity got no batches.")
    return {layer: sums[layer] / counts[layer] for layer in sums}


@torch.no_grad()
def mode_loss_on_data(model: nn.Module, data: Any, variant: str = "all", batch_size: int = 64,
                      collate_fn: Callable | None = None, max_batches: int | None = None,
                      label_key: str = "labels") -> float:
    """The MoDE loss (`hf_moekd.mode.losses`, per example, averaged over the examples of `data`) in eval mode: the
    experts' relative squared deviation from their peers' mean, i.e. the quantity MoDE minimises; `variant` as in
    `MoDEConfig`."""
    total, count = 0.0, 0
    for calls, inputs, n_examples in _expert_calls(model, data, variant, batch_size, collate_fn, max_batches, label_key):
        total += float(mode_loss_per_example(calls, n_examples, inputs.get("attention_mask")).sum())
        count += n_examples
    if not count:
        raise ValueError("mode_loss_on_data got no batches.")
    return total / count


__all__ = ["expert_output_similarity", "expert_weight_similarity", "mean_pairwise_cosine", "mode_loss_on_data"]
