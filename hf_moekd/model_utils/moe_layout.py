"""Where a model keeps its experts: the one structural test that gathering, MoDE / expert probing and m2mKD share.

A *sparse block* is the parent of a module named ``experts`` (``model.layers.3.mlp`` holds ``mlp.experts``, its
router and any shared experts). transformers' fused experts modules (every MoE family of transformers 5:
``gate_up_proj [E, 2I, H]`` or ``up_proj [E, I, H]``, ``down_proj [E, H, I]``, flags set by
``@use_experts_implementation``) are described by an :class:`ExpertsLayout`; other experts containers (Switch's and
NLLB-MoE's ``ModuleDict`` of ``expert_{e}``, V-MoE's ``w_in``/``w_out``) have no layout and are read by their
family's own reader.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["ExpertsLayout", "MoEBlock", "fused_experts_layout", "moe_blocks"]


@dataclass(frozen=True)
class ExpertsLayout:
    """How one fused experts module stores its weights."""

    num_experts: int
    gated: bool = True
    """``gate_up_proj`` (gate and up projections; SwiGLU and variants) rather than ``up_proj`` alone."""
    transposed: bool = False
    """``[E, H, 2I]`` / ``[E, I, H]`` (input dimension first) instead of ``[E, 2I, H]`` / ``[E, H, I]``."""
    concatenated: bool = True
    """Gate rows then up rows; False: interleaved ``gate0, up0, gate1, ...`` (GPT-OSS)."""
    bias: bool = False
    """``gate_up_proj_bias`` / ``down_proj_bias`` present."""

    @property
    def in_name(self) -> str:
        return "gate_up_proj" if self.gated else "up_proj"


def fused_experts_layout(module: nn.Module) -> ExpertsLayout | None:
    """The layout of a transformers fused experts module; None for any other module."""
    params = dict(module.named_parameters(recurse=False))
    proj, down = params.get("gate_up_proj", params.get("up_proj")), params.get("down_proj")
    if proj is None or down is None or proj.dim() != 3 or down.dim() != 3 or not hasattr(module, "num_experts"):
        return None
    transposed = getattr(module, "is_transposed", None)
    if transposed is None:  # not flagged by @use_experts_implementation (Llama-4): read it off the shapes
        transposed = _transposed_by_shape(proj.shape, down.shape, getattr(module, "hidden_size", None))
    return ExpertsLayout(
        num_experts=int(module.num_experts), gated="gate_up_proj" in params, transposed=bool(transposed),
        concatenated=bool(getattr(module, "is_concatenated", True)), bias=bool(getattr(module, "has_bias", False)))


def _transposed_by_shape(proj: tuple[int, ...], down: tuple[int, ...], hidden: int | None) -> bool:
    """``[E, H, 2I]`` / ``[E, I, H]`` when only that reading puts the hidden size where it belongs."""
    if hidden is None:
        return False
    plain, transposed = proj[2] == hidden == down[1], proj[1] == hidden == down[2]
    return transposed and not plain


@dataclass(frozen=True)
class MoEBlock:
    """One sparse block: its qualified name, its experts' layout (None: not a fused experts module) and the names
    of its other direct children (router, shared experts, ...)."""

    prefix: str
    layout: ExpertsLayout | None
    others: tuple[str, ...]


def moe_blocks(model: nn.Module) -> dict[str, MoEBlock]:
    """Every sparse block of ``model`` (the parents of modules named ``experts``), in module order."""
    blocks: dict[str, MoEBlock] = {}
    for name, module in model.named_modules():
        parent, _, leaf = name.rpartition(".")
        if leaf != "experts" or parent in blocks:
            continue
        siblings = tuple(n for n, _ in model.get_submodule(parent).named_children() if n != "experts")
        params = tuple(n for n, _ in model.get_submodule(parent).named_parameters(recurse=False))
        buffers = tuple(n for n, _ in model.get_submodule(parent).named_buffers(recurse=False))
        blocks[parent] = MoEBlock(parent, fused_experts_layout(module), siblings + params + buffers)
    return blocks
