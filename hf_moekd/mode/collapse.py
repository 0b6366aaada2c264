"""Watching MoDE's failure mode: a mutual-distillation weight too strong pulls the experts into copies of each other.
`CollapseWatch` measures, on the outputs MoDE already records, how alike the experts of each layer are, and warns."""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ..model_utils.experts import ExpertCall
from .config import DEFAULT_COLLAPSE_COSINE

logger = logging.getLogger(__name__)


def mean_pairwise_cosine(vectors: torch.Tensor) -> torch.Tensor:
    """``[...]``: mean over pairs i < j of cos(v_i, v_j) for vectors ``[..., E, D]`` (E >= 2)."""
    n = vectors.shape[-2]
    if n < 2:
        raise ValueError("mean_pairwise_cosine needs at least two vectors.")
    unit = F.normalize(vectors.float(), dim=-1)
    gram = unit @ unit.transpose(-1, -2)
    return (gram.sum((-1, -2)) - gram.diagonal(dim1=-2, dim2=-1).sum(-1)) / (n * (n - 1))


class CollapseWatch:
    """Warns once per MoE layer when the mean pairwise cosine of the experts' outputs over a batch's tokens exceeds
    `threshold` (plain training keeps it near 0; collapsed experts reach 1)."""

    def __init__(self, threshold: float = DEFAULT_COLLAPSE_COSINE) -> None:
        self.threshold = threshold
        self.warned: set[str] = set()
        self.last: dict[str, float] = {}
        """Layer -> mean pairwise cosine of the last observed batch."""

    @torch.no_grad()
    def observe(self, calls: list[ExpertCall]) -> None:
        for call in calls:
            if call.outputs is None or call.outputs.shape[1] < 2:
                continue
            cosine = float(mean_pairwise_cosine(call.outputs.detach()).mean())
            self.last[call.layer] = cosine
            if cosine > self.threshold and call.layer not in self.warned:
                self.warned.add(call.layer)
                logger.warning("MoDE: the experts of %s are collapsing into copies (mean pairwise cosine of their "
                               "outputs %.3f > %.2f); lower the MoDE weight (mode_alpha).", call.layer, cosine,
                               self.threshold)
