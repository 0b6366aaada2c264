"""OPDF tensor constraint: keep the student's auxiliary MPO tensors close to the teacher's.

For every student `MPOLinear` in block ``i``, the linear of the same relative name in teacher block
``layer_map[i]`` (default ``2i + 1``, clipped to the teacher's depth) is MPO-decomposed with the student's
factorisation, bond dimensions, central index and gauge. With ``reduction="sum"`` (default, as ``loss_layer_fn`` of
the official ``run_glue_mpo_laterloss.py``: cores 0, 1, 3, 4 of 5) the MSEs between the student's auxiliary cores and
the teacher's are summed per layer and the layers averaged; ``reduction="mean"`` averages over all (layer, auxiliary
core) pairs instead (1/4 of the sum with 5 cores). Central tensors are not constrained.

Unlike the official OPDF code (which reads cores through ``state_dict()``, i.e. detached, so the term has no
gradient), the student's cores are read as live parameters: the constraint trains them.

Gauge note: an MPO is only defined up to invertible matrices on its bonds, so cores of two matrices are comparable
only when both come from the same canonical decomposition of related weights. `mpo_decompose` fixes the gauge with
sign-fixed singular vectors, and the teacher is decomposed in the student layer's gauge. The gauge changes what is
compared: with ``"official"`` (default) the outer cores carry the weight's scale and the singleton middle cores are
identities; with ``"center"`` the auxiliary cores are pure (isometric) bases. The constraint is meaningful when the
student is initialised from the mapped teacher layers, as in OPDF (e.g.
``hf_moekd.model_utils.students.student_from_teacher_layers(teacher, [1, 3, 5, ...])`` before `overparameterize`): then
the term starts at 0 and measures how far training moves the student's auxiliary tensors from the teacher's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model_utils.capture import find_blocks, unwrap
from ..model_utils.students import teacher_layers_of
from ..distillation.losses import DistillationBatch, LossTerm, batch_size, register_loss
from .decomposition import mpo_decompose
from .layers import MPOLinear
from .model import mpo_modules

__all__ = ["MPOConstraintLoss", "REDUCTIONS", "default_layer_map"]

REDUCTIONS = ("sum", "mean")


def default_layer_map(student_layers: int, teacher_layers: int) -> dict[int, int]:
    """Student block i -> teacher block 2i + 1 (0-based), clipped to the teacher's last block."""
    return {i: min(2 * i + 1, teacher_layers - 1) for i in range(student_layers)}


@register_loss("mpo_constraint")
class MPOConstraintLoss(LossTerm):
    """MSE between the student's and the (mapped) teacher's auxiliary MPO tensors, summed over a layer's cores.

    Args:
        layer_map: student block -> teacher block (0-based); student blocks left out are not constrained.
            Default: the teacher block each student block was initialised from (`student_from_teacher_layers`
            records it), so the constraint starts at 0 and pulls each block back toward its own origin; for other
            students `default_layer_map` (2i + 1). `MPOLinear` layers outside the blocks pair with the teacher module of
            the same name.
        reduction: ``"sum"`` (default, the official code): per layer the sum of its auxiliary cores' MSEs, averaged
            over layers; ``"mean"``: the average over all (layer, auxiliary core) pairs (1/(n-1) of the sum with n
            cores). E.g. ``--extra_loss_terms 'mpo_constraint=1e-4,reduction=mean'``.

    The value is data independent; it is returned so that it sums to exactly this regulariser over the micro-batches
    and processes of an optimizer step.
    """

    needs_teacher = False
    card_method = "opdf"

    def __init__(self, student: nn.Module | None = None, teacher: nn.Module | None = None, *,
                 layer_map: dict[int, int] | None = None, reduction: str = "sum") -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"mpo_constraint reduction must be one of {list(REDUCTIONS)} ('sum': over each layer's "
                             f"auxiliary cores, as the official code; 'mean': over all cores), got {reduction!r}.")
        self.reduction = reduction
        if student is None or teacher is None:
            raise ValueError("mpo_constraint needs the teacher model (its weights), not only precomputed logits.")
        student, teacher = unwrap(student), unwrap(teacher)
        layers = mpo_modules(student)
        if not layers:
            raise ValueError("mpo_constraint found no MPOLinear in the student: call hf_moekd.opdf.overparameterize first.")
        s_blocks, t_blocks = find_blocks(student), find_blocks(teacher)
        if layer_map is None:
            origin = teacher_layers_of(unwrap(student))
            layer_map = dict(enumerate(origin)) if origin else default_layer_map(len(s_blocks), len(t_blocks))
        self.layer_map = {int(s): int(t) for s, t in layer_map.items()}
        for s, t in self.layer_map.items():
            if not (0 <= s < len(s_blocks) and 0 <= t < len(t_blocks)):
                raise ValueError(f"layer_map entry {s}->{t} is out of range: the student has blocks 0..{len(s_blocks) - 1}, "
                                 f"the teacher 0..{len(t_blocks) - 1}.")
        block_of = {id(m): (i, rel) for i, block in enumerate(s_blocks) for rel, m in block.named_modules() if isinstance(m, MPOLinear)}

        # Plain lists: the student's layers must not become submodules of the term (the trainer optimises
        # the term's own parameters separately).
        self._layers: list[tuple[str, MPOLinear, list[int]]] = []
        for name, layer in layers.items():
            if id(layer) in block_of:
                i, rel = block_of[id(layer)]
                if i not in self.layer_map:
                    continue
                t_name, t_module = f"block {self.layer_map[i]}.{rel}", _get(t_blocks[self.layer_map[i]], rel, name)
            else:
                t_name, t_module = name, _get(teacher, name, name)
            self._add_pair(name, layer, t_name, t_module)
        if not self._layers:
            raise ValueError(f"mpo_constraint: no student MPOLinear lies in a mapped block (layer_map={self.layer_map}).")
        self.pair_names = [name for name, _, _ in self._layers]

    def _add_pair(self, name: str, layer: MPOLinear, t_name: str, t_module: nn.Module) -> None:
        if isinstance(t_module, MPOLinear):
            weight = t_module.weight().detach()
        elif isinstance(t_module, nn.Linear):
            weight = t_module.weight.detach()
        else:
            raise ValueError(f"Teacher module {t_name} for student {name} is a {type(t_module).__name__}, not a linear.")
        if tuple(weight.shape) != (layer.out_features, layer.in_features):
            raise ValueError(
                f"Teacher {t_name} has weight shape {tuple(weight.shape)} but student {name} has "
                f"{(layer.out_features, layer.in_features)}: the MPO constraint needs teacher and student linears of the same shape."
            )
        dec = mpo_decompose(weight, layer.row_factors, layer.col_factors, max_bond=layer.max_bond,
                            center=layer.central_index, gauge=layer.gauge)
        aux = layer.auxiliary_indices
        for k in aux:
            if dec.cores[k].shape != layer.cores[k].shape:
                raise ValueError(f"Teacher {t_name} core {k} has shape {tuple(dec.cores[k].shape)} but student {name}'s "
                                 f"has {tuple(layer.cores[k].shape)} (different bond dimensions).")
            self.register_buffer(f"teacher_{len(self._layers)}_{k}", dec.cores[k].to(layer.cores[k]), persistent=False)
        self._layers.append((name, layer, aux))

    def regulariser(self) -> torch.Tensor:
        """MSE(student core, teacher core) reduced by `reduction` (layers averaged); differentiable in the student."""
        per_layer = [
            torch.stack([F.mse_loss(layer.cores[k].float(),
                                    getattr(self, f"teacher_{idx}_{k}").to(layer.cores[k].device).float()) for k in aux])
            for idx, (_, layer, aux) in enumerate(self._layers)
        ]
        if self.reduction == "mean":
            return torch.cat(per_layer).mean()
        return torch.stack([losses.sum() for losses in per_layer]).mean()

    def forward(self, batch: DistillationBatch) -> torch.Tensor:
        # The trainer divides by the optimizer step's example count: scale by this micro-batch's so the
        # micro-steps (and processes) add up to the regulariser exactly once.
        return batch.per_example(self.regulariser() * batch_size(batch.inputs))


def _get(root: nn.Module, name: str, student_name: str) -> nn.Module:
    try:
        return root.get_submodule(name)
    except AttributeError as err:
        raise ValueError(f"The teacher has no module {name!r} to pair with the student's {student_name!r}.") from err
