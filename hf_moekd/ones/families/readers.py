"""Reading one sparse block's experts as :class:`ExpertWeights`, whatever the checkpoint's naming.

transformers' own conversion table (``transformers.conversion_mapping``) says how each family's published
checkpoints name their tensors: renamings (Mixtral's ``block_sparse_moe`` -> ``mlp``, Granite's ``input_linear`` ->
``experts.gate_up_proj``) and per-expert tensors merged on load (``experts.{e}.w1/w3.weight`` -> ``gate_up_proj``).
:func:`disk_renames` and :func:`per_expert_parts` read that table, so a checkpoint is understood exactly as
``from_pretrained`` understands it, without loading it. The generic reader (:func:`fused_or_per_expert`) accepts
both the in-memory fused tensors (any :class:`ExpertsLayout`: transposed, interleaved gate/up, biases) and the
per-expert ones, which it reads one expert at a time (:class:`LazyStack`).
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Callable, Iterable

import torch
from torch import Tensor
from transformers import PretrainedConfig

from ...model_utils.moe_layout import ExpertsLayout
from ..strategies import ExpertWeights

__all__ = ["BlockReader", "LazyStack", "materialize", "Reader", "disk_renames", "per_expert_parts", "fused_or_per_expert", "plain_reader",
           "fused_reader", "split_gate_up", "join_gate_up"]

_DEFAULT_PARTS = {"gate_up_proj": [("gate_proj", "up_proj"), ("w1", "w3")], "up_proj": [("up_proj",), ("w1",)],
                  "down_proj": [("down_proj",), ("w2",)]}


class BlockReader:
    """The tensors of one sparse block, addressed by names relative to the block prefix."""

    def __init__(self, prefix: str, names: Iterable[str], get: Callable[[str], Tensor], where: str) -> None:
        self.prefix, self.names, self._get, self.where = prefix, set(names), get, where

    def has(self, name: str) -> bool:
        return name in self.names

    def get(self, name: str) -> Tensor:
        self.require([name])
        return self._get(name)

    def require(self, names: Iterable[str]) -> None:
        if missing := [n for n in names if n not in self.names]:
            shown = ", ".join(f"{self.prefix}.{n}" for n in missing[:4]) + (" ..." if len(missing) > 4 else "")
            raise ValueError(f"missing expert tensor(s) {shown} in {self.where} ({len(missing)} missing); the checkpoint is incomplete")


Reader = Callable[[BlockReader, PretrainedConfig, "ExpertsLayout | None"], ExpertWeights]


@lru_cache(maxsize=None)
def _conversions(model_type: str) -> tuple:
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:  # pragma: no cover - transformers < 5
        return ()
    return tuple(get_checkpoint_conversion_mapping(model_type) or ())


def disk_renames(model_type: str) -> tuple[tuple[str, str], ...]:
    """``(regex, replacement)`` pairs turning on-disk tensor names into in-memory ones (transformers' renamings)."""
    out = []
    for conv in _conversions(model_type):
        if type(conv).__name__ == "WeightRenaming":
            out += [(s, t) for s, t in zip(conv.source_patterns, conv.target_patterns)]
    return tuple(out)


def per_expert_parts(model_type: str) -> dict[str, list[tuple[str, ...]]]:
    """Per fused tensor (``gate_up_proj``, ``up_proj``, ``down_proj``): the per-expert leaf names merged into it on
    load, in order (e.g. ``gate_up_proj <- (w1, w3)``), first from transformers' table, then the common spellings."""
    parts = {k: list(v) for k, v in _DEFAULT_PARTS.items()}
    for conv in _conversions(model_type):
        targets = [t for t in conv.target_patterns if re.search(r"experts\.(gate_up_proj|up_proj|down_proj)$", t)]
        leaves = [m.group(1) for s in conv.source_patterns if (m := re.search(r"experts\.\*\.(\w+)\.weight$", s))]
        if type(conv).__name__ == "WeightConverter" and len(targets) == 1 and leaves:
            parts[targets[0].rsplit(".", 1)[1]].insert(0, tuple(leaves))
    return parts


def split_gate_up(w: Tensor, layout: ExpertsLayout, dim: int) -> list[Tensor]:
    """``[gate, up]`` halves of a fused gate/up tensor along ``dim`` (concatenated or interleaved)."""
    if not layout.gated:
        return [w]
    if layout.concatenated:
        return list(w.chunk(2, dim=dim))
    n = w.shape[dim]
    return [w.index_select(dim, torch.arange(0, n, 2)), w.index_select(dim, torch.arange(1, n, 2))]


def join_gate_up(parts: list[Tensor], layout: ExpertsLayout, dim: int) -> Tensor:
    """The inverse of :func:`split_gate_up`."""
    if not layout.gated:
        return parts[0]
    if layout.concatenated:
        return torch.cat(parts, dim=dim)
    return torch.stack(parts, dim=dim + 1).flatten(dim, dim + 1)


def fused_or_per_expert(model_type: str) -> Reader:
    """Experts of a transformers fused experts module, from fused or per-expert tensors."""

    def read(r: BlockReader, config: PretrainedConfig, layout: ExpertsLayout | None) -> ExpertWeights:
        if layout is None:
            raise ValueError(f"{r.prefix}.experts is not a fused experts module; this family needs its own reader")
        name = f"experts.{layout.in_name}"
        if r.has(name) or r.has("experts.down_proj"):
            w_in, w_out = r.get(name), r.get("experts.down_proj")
            if layout.transposed:  # [E, H, 2I] / [E, I, H] -> [E, 2I, H] / [E, H, I]
                w_in, w_out = w_in.transpose(1, 2), w_out.transpose(1, 2)
            b_in = split_gate_up(r.get(f"{name}_bias"), layout, 1) if layout.bias else None
            b_out = r.get("experts.down_proj_bias") if layout.bias else None
            return ExpertWeights(split_gate_up(w_in, layout, 1), w_out, b_in, b_out)
        parts = per_expert_parts(model_type)
        leaves_in = _first_present(r, parts[layout.in_name], layout.num_experts)
        leaves_out = _first_present(r, parts["down_proj"], layout.num_experts)
        stack = _stacker(r, layout.num_experts)
        return ExpertWeights([stack(f"experts.{{e}}.{leaf}.weight") for leaf in leaves_in],
                             stack(f"experts.{{e}}.{leaves_out[0]}.weight"))

    return read


def _first_present(r: BlockReader, candidates: list[tuple[str, ...]], num_experts: int) -> tuple[str, ...]:
    for leaves in candidates:
        if all(r.has(f"experts.0.{leaf}.weight") for leaf in leaves):
            return leaves
    shown = sorted(r.names)[:6]
    raise ValueError(f"cannot find the experts' tensors of {r.prefix} in {r.where}: expected fused experts.* tensors or "
                     f"per-expert experts.{{e}}.<{'|'.join('/'.join(c) for c in candidates)}>.weight, found {shown}")


def plain_reader(expert: str, w_in: str, w_out: str, bias: bool = False) -> Reader:
    """Per-expert two-matrix FFNs, e.g. Switch ``experts.expert_{e}.wi / wo`` (NLLB-MoE's ``fc1 / fc2`` with biases)."""

    def read(r: BlockReader, config: PretrainedConfig, layout: ExpertsLayout | None) -> ExpertWeights:
        stack = _stacker(r, config.num_experts)
        b_in, b_out = ([stack(f"{expert}.{w_in}.bias")], stack(f"{expert}.{w_out}.bias")) if bias else (None, None)
        return ExpertWeights([stack(f"{expert}.{w_in}.weight")], stack(f"{expert}.{w_out}.weight"), b_in, b_out)

    return read


def fused_reader(w_in: str, w_out: str, b_in: str | None = None, b_out: str | None = None) -> Reader:
    """Fused plain experts: ``w_in [E, I, H]``, ``w_out [E, H, I]``, optional ``b_in [E, I]``, ``b_out [E, H]``."""

    def read(r: BlockReader, config: PretrainedConfig, layout: ExpertsLayout | None) -> ExpertWeights:
        return ExpertWeights([r.get(w_in)], r.get(w_out), None if b_in is None else [r.get(b_in)],
                             None if b_out is None else r.get(b_out))

    return read


class LazyStack:
    """``[E, ...]`` per-expert tensors read from the checkpoint one expert at a time, so that strategies which go
    over the experts one by one (:data:`..strategies.STREAMING`) hold one expert, not the layer. Indexing with an
    int reads that expert; with a list / tensor it selects experts (still lazy)."""

    def __init__(self, names: list[str], get: Callable[[str], Tensor]) -> None:
        self.names, self._get = names, get
        first = get(names[0])
        self.shape, self.dtype, self.device = torch.Size((len(names), *first.shape)), first.dtype, first.device

    def dim(self) -> int:
        return len(self.shape)

    def __getitem__(self, index) -> "Tensor | LazyStack":
        if isinstance(index, int) or (isinstance(index, Tensor) and index.dim() == 0):
            return self._get(self.names[int(index)])
        return LazyStack([self.names[int(i)] for i in index], self._get)

    def materialize(self) -> Tensor:
        out = torch.empty(self.shape, dtype=self.dtype)  # filled one expert at a time: no second copy
        for e, name in enumerate(self.names):
            out[e] = self._get(name)
        return out


def materialize(t: "Tensor | LazyStack") -> Tensor:
    return t.materialize() if isinstance(t, LazyStack) else t


def _stacker(r: BlockReader, num_experts: int) -> Callable[[str], LazyStack]:
    def stack(pattern: str) -> LazyStack:
        names = [pattern.format(e=e) for e in range(num_experts)]
        r.require(names)
        return LazyStack(names, r.get)

    return stack
