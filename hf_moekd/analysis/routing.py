"""How an MoE routes: tokens per expert per layer."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..model_utils.experts import adapter_for, find_experts
from ..mode.losses import real_tokens
from .diversity import _expert_calls


def has_experts(model: nn.Module) -> bool:
    """True when `model` has an MoE experts module that `find_experts` supports."""
    return any(adapter_for(module) is not None for module in model.modules())


@torch.no_grad()
def routing_counts(model: nn.Module, data: Any, batch_size: int = 64, collate_fn: Callable | None = None,
                   max_batches: int | None = None, label_key: str = "labels") -> dict[str, torch.Tensor]:
    """Per MoE layer, in forward order: `[E]` tokens routed to each expert over the real tokens (attention_mask 1) of
    `data` in eval mode; each of a token's top-k choices counts once. `data` as for `probe_experts`."""
    counts = {name: torch.zeros(adapter.num_experts, dtype=torch.long) for name, adapter in find_experts(model).items()}
    for calls, inputs, n_examples in _expert_calls(model, data, None, batch_size, collate_fn, max_batches, label_key):
        for call in calls:
            mask = real_tokens(call.index.shape[0], n_examples, inputs.get("attention_mask")).reshape(-1)
            chosen = call.index[mask.to(call.index.device)].reshape(-1).cpu()
            counts[call.layer] += torch.bincount(chosen, minlength=len(counts[call.layer]))
    if not any(int(c.sum()) for c in counts.values()):
        raise ValueError("routing_counts got no tokens.")
    return counts


__all__ = ["has_experts", "routing_counts"]
