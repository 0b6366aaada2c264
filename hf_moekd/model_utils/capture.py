"""Capture intermediate tensors (attention Q/K/V projections) with forward hooks, without editing models."""
from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

# Projection names across transformers families: BERT/ViT (query/key/value), Llama-style (q_proj, ...).
QKV_NAMES = {"q": ("query", "q_proj", "q_lin"), "k": ("key", "k_proj", "k_lin"), "v": ("value", "v_proj", "v_lin")}


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP / DeepSpeed / torch.compile / peft wrappers (a PeftModel's base model, adapters in it)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    model = getattr(model, "_orig_mod", model)
    return model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer's list of blocks: the largest `nn.ModuleList` whose name ends in `layer(s)`/`blocks`/`h`."""
    model = unwrap(model)
    candidates = [
        module for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and re.search(r"(^|\.)(layers?|blocks|h|block)$", name)
    ]
    if not candidates:
        raise ValueError(f"Could not find the list of transformer blocks in {type(model).__name__}.")
    return max(candidates, key=len)


def qkv_modules(block: nn.Module) -> dict[str, nn.Module]:
    """The query/key/value projection modules of one block."""
    found: dict[str, nn.Module] = {}
    for name, module in block.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        for kind, names in QKV_NAMES.items():
            if leaf in names and kind not in found:
                found[kind] = module
    if len(found) != 3:
        raise ValueError(
            f"Block {type(block).__name__} has no separate query/key/value projections ({sorted(found)} found); "
            "the attention relation loss needs them."
        )
    return found


@contextmanager
def capture_qkv(
    model: nn.Module, layer: int, store: dict[str, torch.Tensor] | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Record the Q, K and V projection outputs of block `layer` into `store` (keys 'q', 'k', 'v')."""
    blocks = find_blocks(model)
    store = {} if store is None else store

    def make_hook(kind: str):
        def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            store[kind] = output
        return hook

    handles = [m.register_forward_hook(make_hook(k)) for k, m in qkv_modules(blocks[layer]).items()]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def capture_block_output(model: nn.Module, layer: int, store: dict[str, torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
    """Record the hidden states block `layer` returns (its first output) into `store["hidden"]`."""
    def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor | tuple) -> None:
        store["hidden"] = output[0] if isinstance(output, tuple) else output

    handle = find_blocks(model)[layer].register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()
