"""Cutting a model into N modules of consecutive blocks, the shallow meta model, stitches, and re-assembly.

Module i of a model with L blocks holds blocks `[i * L/N, (i + 1) * L/N)`; module 0 also holds the stem
(embeddings) and module N - 1 the head, so that running the N modules in order is the whole model (exactly).
A `Segment` holds references to the model's own submodules: training a segment trains the model in place.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from transformers import PreTrainedModel

from ..model_utils.students import student_from_teacher_layers
from .layouts import Layout, Inputs, Routers, layout_of

META_INITS = ("teacher", "scratch")


def check_num_modules(num_blocks: int, num_modules: int, what: str) -> int:
    """Blocks per module; a clear error unless `num_modules` divides `num_blocks`."""
    if num_modules < 1 or num_blocks % num_modules:
        divisors = [d for d in range(1, num_blocks + 1) if num_blocks % d == 0]
        raise ValueError(f"cannot cut the {num_blocks} blocks of the {what} into {num_modules} modules of "
                         f"consecutive blocks: choose num_modules among {divisors} (or change the {what}'s depth).")
    return num_blocks // num_modules


class Segment(nn.Module):
    """Module `index` of `model` cut into `num_modules`: its blocks, plus the stem (first) and the head (last).

    `forward(hidden, inputs)` returns `(output, router_logits)`: hidden states `[batch, seq, hidden_size]`, or the
    logits for the last module. The first module ignores `hidden` and embeds `inputs`.
    """

    def __init__(self, model: PreTrainedModel, index: int, num_modules: int):
        super().__init__()
        self.layout: Layout = layout_of(model)
        stem, blocks_name, head = self.layout.parts(model)
        blocks = model.get_submodule(blocks_name)
        per_module = check_num_modules(len(blocks), num_modules, f"{model.config.model_type} model")
        if not 0 <= index < num_modules:
            raise ValueError(f"module index {index} is out of range: the modules are 0..{num_modules - 1}.")
        self.config, self.index, self.num_modules = model.config, index, num_modules
        self.hidden_size: int = model.config.hidden_size
        self.block_indices = range(index * per_module, (index + 1) * per_module)
        self.stem = nn.ModuleDict({n.rsplit(".", 1)[-1]: model.get_submodule(n) for n in stem}) if index == 0 else None
        self.blocks = nn.ModuleList(blocks[i] for i in self.block_indices)
        self.head = (nn.ModuleDict({n.rsplit(".", 1)[-1]: model.get_submodule(n) for n in head})
                     if index == num_modules - 1 else None)
        names = [f"{blocks_name}.{i}" for i in self.block_indices]
        names += stem if self.stem is not None else []
        names += head if self.head is not None else []
        self.prefixes = tuple(f"{name}." for name in names)
        """Prefixes of the model's state-dict keys that belong to this module."""

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_modules - 1

    def forward(self, hidden: torch.Tensor | None, inputs: Inputs) -> tuple[torch.Tensor, Routers]:
        if self.stem is not None:
            hidden = self.layout.embed(self.stem, inputs)
        elif hidden is None:
            raise ValueError(f"module {self.index} needs the hidden states of module {self.index - 1}.")
        routers: Routers = ()
        for block in self.blocks:
            hidden, found = self.layout.block(self.config, block, hidden, inputs)
            routers += found
        if self.head is not None:
            hidden = self.layout.head(self.head, hidden)
        return hidden, routers


def split_model(model: PreTrainedModel, num_modules: int) -> list[Segment]:
    """`model` as `num_modules` modules of consecutive blocks (stem in the first, head in the last)."""
    return [Segment(model, i, num_modules) for i in range(num_modules)]


def run_segments(segments: Sequence[nn.Module], inputs: Inputs,
                 hidden: torch.Tensor | None = None) -> tuple[torch.Tensor | None, Routers]:
    """Run modules one after the other (from `hidden`, or from `inputs` when the first one holds the stem): the
    output of the last one and the router logits of all."""
    routers: Routers = ()
    for segment in segments:
        hidden, found = segment(hidden, inputs)
        routers += found
    return hidden, routers


class Stitch(nn.Module):
    """LayerNorm + Linear from `in_features` to `out_features` (m2mKD's stitch layer between two widths).

    When the widths are equal the stitch is the identity and holds no parameters: every module keeps a pre- and a
    post-stitch (one interface), and a module of the meta model's width plugs in unchanged.
    """

    def __init__(self, in_features: int, out_features: int, eps: float = 1e-12):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.norm = nn.LayerNorm(in_features, eps=eps) if in_features != out_features else None
        self.proj = nn.Linear(in_features, out_features) if in_features != out_features else None

    @property
    def is_identity(self) -> bool:
        return self.proj is None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.shape[-1] != self.in_features:
            raise ValueError(f"stitch expects hidden states of width {self.in_features}, got {hidden.shape[-1]}: "
                             "the module's width does not match the stitch; build the path with the right widths.")
        return hidden if self.proj is None else self.proj(self.norm(hidden))


def build_meta(teacher: PreTrainedModel, num_modules: int, init: str = "scratch") -> PreTrainedModel:
    """The shallow meta model: the teacher's architecture (stem, width, head) with one block per module.

    `init="scratch"` (default, official) is a fresh initialisation (seed with `set_seed` first): the official recipe
    pre-trains the meta model from scratch in its own phase (kamanphoebe/m2mKD TRAIN-MOE.md lines 22-26, `--phase PT
    --divided_depths 1 1 1 1 --epochs 300`; see `M2MConfig`). `init="teacher"` copies the teacher's stem, head and
    the first block of each teacher module. Train it on the task before use (it is trainable).
    """
    layout = layout_of(teacher)
    if teacher.config.model_type != layout.dense_type:
        raise ValueError(f"the teacher must be a monolithic dense model ({layout.dense_type!r} for this layout), got "
                         f"{teacher.config.model_type!r}: its meta model would not reload with the right MoE blocks.")
    _, blocks_name, _ = layout.parts(teacher)
    per_module = check_num_modules(len(teacher.get_submodule(blocks_name)), num_modules, "teacher")
    if init == "teacher":
        return student_from_teacher_layers(teacher, list(range(0, num_modules * per_module, per_module)))
    if init == "scratch":
        config = copy.deepcopy(teacher.config)
        config.num_hidden_layers = num_modules
        return type(teacher)(config)
    raise ValueError(f"meta init {init!r} is unknown; choose one of {META_INITS}.")


def module_state(model: PreTrainedModel, segment: Segment) -> dict[str, torch.Tensor]:
    """The entries of `model.state_dict()` that belong to `segment` (keys as in the full model)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(segment.prefixes)}


def assemble(model: PreTrainedModel, states: Mapping[int, Mapping[str, torch.Tensor]]) -> PreTrainedModel:
    """Load the trained modules `states` (index -> `module_state`) into `model`, which they must cover exactly."""
    expected = model.state_dict()
    merged: dict[str, torch.Tensor] = {}
    for index, state in sorted(states.items()):
        if unknown := sorted(set(state) - set(expected)):
            raise ValueError(f"module {index} has weights the student does not have ({unknown[:3]}...): it was "
                             "trained for another student architecture; retrain it.")
        if overlap := sorted(set(state) & set(merged)):
            raise ValueError(f"module {index} repeats weights of another module ({overlap[:3]}...).")
        merged.update(state)
    if missing := sorted(set(expected) - set(merged)):
        raise ValueError(f"the trained modules do not cover the student: {len(missing)} weights missing "
                         f"({missing[:3]}...); train every module first.")
    for key, value in merged.items():
        if value.shape != expected[key].shape:
            raise ValueError(f"{key}: trained module has shape {tuple(value.shape)}, the student "
                             f"{tuple(expected[key].shape)}; the module was trained for another student width.")
    model.load_state_dict(merged, strict=True)
    return model


__all__ = [
    "META_INITS", "Segment", "Stitch", "assemble", "build_meta", "check_num_modules", "module_state",
    "run_segments", "split_model",
]
