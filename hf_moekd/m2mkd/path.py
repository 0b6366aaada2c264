"""The hybrid networks of m2mKD: the meta model with one of its modules replaced by a student or a teacher module.

    inputs -> meta modules [0, i) -> pre-stitch -> module i -> post-stitch -> meta modules (i, N) -> logits

Module 0 embeds the inputs itself (no pre-stitch is applied) and module N - 1 ends in its own head (no post-stitch).
The meta model is frozen and stays in eval mode. The student path trains module i and its two stitches; the
teacher path is frozen as a whole and needs no stitch: the meta model has the teacher's width.

A path's loss has no gate (load-balancing) term unless asked (`gate_loss=True`): the official module phase
(kamanphoebe/m2mKD deep_incubation/losses.py, `m2mKDLoss.forward`, lines 139-169) is the task loss plus the KD term
only. The routers' balancing loss is still computed and returned as `aux_loss`, for monitoring.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .modules import Segment, Stitch, run_segments


@dataclass
class M2MPathOutput(ModelOutput):
    """`loss` (with labels): cross-entropy, plus `router_aux_loss_coef * aux_loss` for a path built with
    `gate_loss=True`; `aux_loss`: the load-balancing loss of the module's MoE layers (None without routers)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


class M2MPath(nn.Module):
    """Meta modules before `module.index`, `pre`, `module`, `post`, meta modules after it; callable like a classifier
    (`pixel_values` or `input_ids`/`attention_mask`/`token_type_ids`, optional `labels`).

    `gate_loss`: keep the module's load-balancing loss in the path's loss, with the weight of its config's
    `router_aux_loss_coef` (False: none, as the official m2mKD). The path's `config` (what a trainer reads, e.g.
    `DistillationTrainer`'s automatic `router_aux` term) is a copy of the module's with `router_aux_loss_coef` 0
    when `gate_loss` is False; the student's own config is not changed.
    """

    def __init__(self, meta: Sequence[Segment], module: Segment, pre: Stitch, post: Stitch, gate_loss: bool = False):
        super().__init__()
        i, width = module.index, meta[0].hidden_size
        if len(meta) != module.num_modules or meta[i].index != i:
            raise ValueError(f"the meta model is cut into {len(meta)} modules but module {i} comes from a cut into "
                             f"{module.num_modules}; cut both into the same number of modules.")
        if meta[0].layout.name != module.layout.name:
            raise ValueError(f"a {module.layout.name} module cannot replace a module of a {meta[0].layout.name} meta "
                             "model; use a teacher, meta model and student of the same layout.")
        for stitch, needed, name in ((pre, not module.is_first, "pre"), (post, not module.is_last, "post")):
            want = (width, module.hidden_size) if name == "pre" else (module.hidden_size, width)
            if needed and (stitch.in_features, stitch.out_features) != want:
                raise ValueError(
                    f"module {i} has width {module.hidden_size} and the meta model {width}, but the {name}-stitch maps "
                    f"{stitch.in_features} -> {stitch.out_features}: use Stitch({want[0]}, {want[1]}) "
                    "(student_path builds the right stitches)."
                )
        self.before, self.after = nn.ModuleList(meta[:i]), nn.ModuleList(meta[i + 1:])
        self.before.requires_grad_(False)
        self.after.requires_grad_(False)
        self.pre, self.module, self.post = pre, module, post
        self.gate_loss = gate_loss
        self.config = module.config  # router_aux_loss_coef and labels, read by the trainer
        if not gate_loss and getattr(module.config, "router_aux_loss_coef", 0.0):
            self.config = copy.deepcopy(module.config)
            self.config.router_aux_loss_coef = 0.0

    def train(self, mode: bool = True) -> M2MPath:
        super().train(mode)
        self.before.eval()  # the frozen meta model never trains (no dropout either)
        self.after.eval()
        return self

    def forward(self, pixel_values: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> M2MPathOutput:
        given = dict(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
                     token_type_ids=token_type_ids)
        inputs = {k: v for k, v in given.items() if v is not None}
        hidden, _ = run_segments(self.before, inputs)
        if not self.module.is_first:
            hidden = self.pre(hidden)
        hidden, routers = self.module(hidden, inputs)
        if not self.module.is_last:
            hidden, _ = run_segments(self.after, inputs, self.post(hidden))
        aux = self.module.layout.aux_loss(self.config, routers, inputs) if routers else None
        loss = None
        if labels is not None:
            loss = F.cross_entropy(hidden.float(), labels)
            if aux is not None and self.gate_loss:
                loss = loss + getattr(self.config, "router_aux_loss_coef", 0.0) * aux
        return M2MPathOutput(loss=loss, logits=hidden, aux_loss=aux)


def student_path(meta: Sequence[Segment], student: PreTrainedModel, index: int, gate_loss: bool = False) -> M2MPath:
    """The path that trains module `index` of `student`, with fresh stitches between the two widths; its loss keeps
    the student's load-balancing loss only with `gate_loss=True` (see `M2MPath`)."""
    module = Segment(student, index, len(meta))
    width, own = meta[0].hidden_size, module.hidden_size
    return M2MPath(meta, module, Stitch(own if module.is_first else width, own),
                   Stitch(own, own if module.is_last else width), gate_loss=gate_loss)


def teacher_path(meta: Sequence[Segment], teacher: PreTrainedModel, index: int) -> M2MPath:
    """The frozen path with module `index` of `teacher`; the meta model must have the teacher's width."""
    if teacher.config.hidden_size != meta[0].hidden_size:
        raise ValueError(f"the meta model has width {meta[0].hidden_size} but the teacher {teacher.config.hidden_size}: "
                         "build the meta model from the teacher (build_meta), so teacher modules plug in unstitched.")
    width = meta[0].hidden_size
    path = M2MPath(meta, Segment(teacher, index, len(meta)), Stitch(width, width), Stitch(width, width))
    return path.requires_grad_(False).eval()


__all__ = ["M2MPath", "M2MPathOutput", "student_path", "teacher_path"]
