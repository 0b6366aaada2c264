"""Counting a model's parameters (ZeRO-3 aware)."""
from __future__ import annotations

import torch
from torch import nn


def numel(param: torch.Tensor) -> int:
    """The full size of a parameter, also when ZeRO-3 has partitioned it (its local tensor is empty)."""
    return int(getattr(param, "ds_numel", param.numel()))


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Parameters of `model`, or only those that train (e.g. MPO cores instead of the linears they replace); full
    sizes also under ZeRO-3."""
    return sum(numel(p) for p in model.parameters() if p.requires_grad or not trainable_only)
