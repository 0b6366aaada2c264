"""Building the dense model's skeleton and placing one gathered block in it, for the three kinds of target.

:func:`moe_structure` finds the sparse blocks (on a meta-device copy of the MoE when gathering from a checkpoint),
:func:`dense_template` the dense model's tensor names and shapes, :func:`place_block` the dense tensors of one block.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig

from ...model_utils.moe_layout import MoEBlock, moe_blocks
from ..strategies import DenseFFN
from .readers import BlockReader, join_gate_up
from .registry import MoEFamily
from .stats import RoutingStats

__all__ = ["DenseTemplate", "moe_structure", "dense_template", "place_block", "shared_ffns", "model_class"]

_MLP_LEAVES = ("gate_proj", "up_proj", "down_proj", "gate_up_proj")


def model_class(config: PretrainedConfig, arch: str | None, auto_class: str) -> type:
    """The class named by ``arch`` when transformers has it, else ``auto_class``'s class for ``config``."""
    import transformers

    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        auto = getattr(transformers, auto_class)
        try:
            cls = auto._model_mapping[type(config)]
        except KeyError:  # text sub-configs of multimodal MoEs: only a base model
            cls = transformers.AutoModel._model_mapping[type(config)]
    return cls


def moe_structure(config: PretrainedConfig, arch: str | None, family: MoEFamily,
                  live: nn.Module | None = None) -> tuple[nn.Module, dict[str, MoEBlock]]:
    """The MoE (``live`` or a meta-device instance: no memory) and its sparse blocks."""
    if live is None:
        with torch.device("meta"):
            live = model_class(config, arch, family.auto_class)._from_config(config)
    return live, moe_blocks(live)


def block_width(model: nn.Module, block: MoEBlock) -> int:
    """Width of a block's gathered FFN: one expert's plus every shared expert's hidden units."""
    module = model.get_submodule(block.prefix)
    down = module.experts.down_proj
    width = down.shape[1] if block.layout is not None and block.layout.transposed else down.shape[-1]
    return width + sum(m.down_proj.weight.shape[1] for _, m in shared_modules(module))


def shared_modules(block: nn.Module) -> list[tuple[str, nn.Module]]:
    """The always-on shared experts of a block: children named ``shared*`` that hold a ``down_proj``."""
    return [(n, m) for n, m in block.named_children()
            if n.startswith("shared") and isinstance(getattr(m, "down_proj", None), nn.Linear)]


@dataclass
class DenseTemplate:
    """The dense model to fill: config, class, every tensor's expected shape, tied names."""

    config: PretrainedConfig
    cls: type
    expected: dict[str, torch.Size]
    tied: dict[str, str]


def dense_template(family: MoEFamily, config: PretrainedConfig, arch: str | None, moe: nn.Module,
                   blocks: dict[str, MoEBlock]) -> DenseTemplate:
    import transformers

    width = max((block_width(moe, b) for b in blocks.values() if b.layout is not None), default=0)
    dense_config = family.dense_config(config, width)
    dense_config.hf_moekd_gathering = {"source_model_type": config.model_type, "target": family.target}
    if family.target == "twin":
        base = type(moe).__name__
        moe_prefix = transformers.AutoModel._model_mapping[type(config)].__name__.removesuffix("Model")
        dense_base = model_class(dense_config, None, "AutoModel").__name__.removesuffix("Model")
        name = dense_base + base[len(moe_prefix):] if base.startswith(moe_prefix) else None
        cls = model_class(dense_config, name, family.auto_class)
    else:
        cls = type(moe)
    with torch.device("meta"):
        meta = cls._from_config(dense_config)
    dense_config.architectures = [type(meta).__name__]
    expected = {k: v.shape for k, v in meta.state_dict().items()}
    return DenseTemplate(dense_config, type(meta), expected, dict(getattr(meta, "all_tied_weights_keys", None) or {}))


def shared_ffns(block: MoEBlock, reader: BlockReader, st: RoutingStats | None, moe: nn.Module) -> list[DenseFFN]:
    """The block's shared experts as dense FFNs; one behind a sigmoid gate (``shared_expert_gate``) is scaled by the
    gate's calibration mean (0.5 = sigmoid(0) without data): exact only when that gate is constant."""
    out = []
    for name, module in shared_modules(moe.get_submodule(block.prefix)):
        f32 = lambda leaf: reader.get(f"{name}.{leaf}.weight").to(torch.float32)  # noqa: E731
        if reader.has(f"{name}.gate_up_proj.weight"):
            in_proj = list(f32("gate_up_proj").chunk(2))
        else:
            in_proj = [f32(leaf) for leaf in ("gate_proj", "up_proj") if reader.has(f"{name}.{leaf}.weight")]
        ffn = DenseFFN(in_proj, f32("down_proj"))
        if reader.has(f"{name}_gate.weight"):
            scale = st.mean("shared_gate") if st is not None else None
            ffn = ffn.scale_output(0.5 if scale is None else scale)
        out.append(ffn)
    return out


def place_block(family: MoEFamily, block: MoEBlock, ffn: DenseFFN, reader: BlockReader, template: DenseTemplate,
                ) -> dict[str, Tensor]:
    """Dense tensors for one block: its FFN in the dense MLP (twin / configured) or as the single expert
    (one_expert, with the block's other tensors copied and expert-indexed ones cut to one zero row)."""
    if family.write_dense is not None:
        return family.write_dense(block.prefix, ffn)
    if family.target != "one_expert":
        return _dense_mlp(block.prefix, ffn, template.expected)
    return {**_single_expert(block, ffn, family.copies), **_others(block, reader, template.expected, family)}


def _dense_mlp(prefix: str, ffn: DenseFFN, expected: dict[str, torch.Size]) -> dict[str, Tensor]:
    layer = prefix.rsplit(".", 1)[0]
    pattern = re.compile(rf"^{re.escape(layer)}\.(\w+)\.({'|'.join(_MLP_LEAVES)})\.weight$")
    mlps = sorted({m.group(1) for n in expected if (m := pattern.match(n)) and not m.group(1).startswith("shared")})
    if len(mlps) != 1:
        raise ValueError(f"cannot place the gathered FFN of {prefix}: the dense model has {mlps or 'no'} MLP(s) in {layer}")
    mlp = f"{layer}.{mlps[0]}"
    if len(ffn.in_proj) == 2 and f"{mlp}.gate_up_proj.weight" in expected:
        width = expected[f"{mlp}.gate_up_proj.weight"][0] // 2
        out = {f"{mlp}.gate_up_proj.weight": torch.cat([_pad_rows(w, width) for w in ffn.in_proj])}
    else:
        leaves = ("gate_proj", "up_proj") if len(ffn.in_proj) == 2 else ("up_proj",)
        out = {f"{mlp}.{leaf}.weight": w for leaf, w in zip(leaves, ffn.in_proj)}
    out[f"{mlp}.down_proj.weight"] = ffn.out_proj
    if ffn.in_bias is not None or ffn.out_bias is not None:
        raise ValueError(f"{prefix}: experts with biases cannot be placed in a bias-free dense MLP")
    return out


def _pad_rows(w: Tensor, rows: int) -> Tensor:
    return w if w.shape[0] == rows else torch.cat([w, w.new_zeros(rows - w.shape[0], *w.shape[1:])])


def _single_expert(block: MoEBlock, ffn: DenseFFN, copies: int = 1) -> dict[str, Tensor]:
    layout, name = block.layout, f"{block.prefix}.experts"
    w_in = join_gate_up([w[None] for w in ffn.in_proj], layout, 1)  # [1, 2I, H]
    w_out = ffn.out_proj[None]  # [1, H, I]
    if layout.transposed:
        w_in, w_out = w_in.transpose(1, 2), w_out.transpose(1, 2)
    out = {f"{name}.{layout.in_name}": w_in, f"{name}.down_proj": w_out}
    if layout.bias:
        zeros = lambda n: ffn.out_proj.new_zeros(n)  # noqa: E731
        biases = ffn.in_bias or [zeros(ffn.out_proj.shape[1])] * len(ffn.in_proj)
        out[f"{name}.{layout.in_name}_bias"] = join_gate_up([b[None] for b in biases], layout, 1)
        out[f"{name}.down_proj_bias"] = (ffn.out_bias if ffn.out_bias is not None else zeros(ffn.out_proj.shape[0]))[None]
    return {k: v.expand(copies, *v.shape[1:]).contiguous() for k, v in out.items()}


def _expert_weight(rel: str) -> bool:
    """``experts.gate_up_proj`` / ``experts.down_proj_bias`` (fused) or ``experts.3.w1.weight`` (per expert)."""
    parts = rel.split(".")
    return parts[0] == "experts" and (len(parts) == 2 or parts[1].isdigit())


def _others(block: MoEBlock, reader: BlockReader, expected: dict[str, torch.Size], family: MoEFamily,
            ) -> dict[str, Tensor]:
    """Every tensor of the block but the experts' own weights, copied (modules inside the experts, such as a norm
    applied to each expert's output, included); expert-indexed ones (router rows, score biases) are cut to the
    dense model's expert count, as zero rows (their first rows with ``family.copy_router``, the values of
    ``family.router_rows``): with one expert the router's choice is fixed and its weight is 1 after softmax /
    renormalisation."""
    out: dict[str, Any] = {}
    fixed = dict(family.router_rows)
    for rel in sorted(reader.names):
        if _expert_weight(rel):
            continue
        name, t = f"{block.prefix}.{rel}", reader.get(rel)
        shape = expected.get(name)
        if shape is None:
            raise ValueError(f"tensor {name!r} has no place in the one-expert model; the checkpoint does not match its config")
        if rel in fixed:
            t = torch.tensor(fixed[rel], dtype=t.dtype).reshape(shape)
        elif t.shape != shape:
            t = t[tuple(slice(0, n) for n in shape)].clone() if family.copy_router and t.dim() == len(shape) \
                else t.new_zeros(shape)
        out[name] = t
    return out
