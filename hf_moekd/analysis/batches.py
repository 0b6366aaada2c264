"""Batches for the analyses: from a DataLoader (or any iterable of dict batches) or from a dataset."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Iterator

import torch
from torch import nn


def iterate_batches(data: Any, batch_size: int = 64, collate_fn: Callable | None = None,
                    max_batches: int | None = None) -> Iterator[dict[str, Any]]:
    """Dict batches of `data`: a `DataLoader` or an iterator / generator of dict batches is used as is; a dataset
    (`__getitem__` + `__len__`: `datasets.Dataset` in torch format, a torch `Dataset`, a list of row dicts) is batched
    in order with `collate_fn` (torch's default when None)."""
    if isinstance(data, torch.utils.data.DataLoader) or not (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        loader = data
    else:
        loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            return
        if not isinstance(batch, Mapping):  # dicts, transformers' BatchEncoding
            raise TypeError(f"Expected dict batches (model keyword arguments), got {type(batch).__name__}; pass a "
                            "DataLoader of dicts or a dataset with a collate_fn that returns dicts.")
        yield dict(batch)


def to_device(batch: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    device = next(model.parameters()).device
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def select_examples(batch: dict[str, Any], keep: torch.Tensor) -> dict[str, Any]:
    """The examples `keep` (boolean `[B]`) of every tensor whose first dimension is the batch."""
    n = keep.shape[0]
    return {k: v[keep] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v
            for k, v in batch.items()}
