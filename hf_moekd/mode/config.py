"""MoDE settings (`MoDEConfig`) and the check that a model can be trained with them."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..model_utils.experts import find_experts, model_top_k

VARIANTS = ("routed", "all")
# The default strength, from this project's measurements (benchmarks/results/mode_all.json, 3 seeds): alpha 0.003 is
# the best of {0, 0.003, 0.01} on Fashion-MNIST (every seed above plain training) and level with plain on SST-2; at
# 0.01 the experts' outputs on Fashion-MNIST are nearly copies (mean pairwise cosine 0.95, plain 0.05).
DEFAULT_MODE_ALPHA = 0.003
# Mean pairwise cosine of the experts' outputs above which training warns that the experts are collapsing.
DEFAULT_COLLAPSE_COSINE = 0.9


@dataclass
class MoDEConfig:
    """Settings of MoDE for `MoDETrainerMixin` (with `DistillationTrainer`, use ``extra_loss_terms=["mode=0.003"]`` or
    ``["mode=0.003,variant=routed"]``: the weight is `mode_alpha`)."""

    mode_alpha: float = field(default=DEFAULT_MODE_ALPHA, metadata={
        "help": "Weight of the mutual-distillation loss (0 disables it). Default 0.003 from the project's sweep "
                "(benchmarks/results/mode_all.json): 0.01 already nearly collapses the experts into copies."})
    variant: str = field(
        default="all",
        metadata={"help": "'all' (default): among all experts, each run on every token (E x FFN compute); 'routed': "
                  "among the k experts that processed each token (no extra compute, needs top-k >= 2)."},
    )
    collapse_cosine: float = field(default=DEFAULT_COLLAPSE_COSINE, metadata={
        "help": "Warn (once per MoE layer) when the experts' outputs in a training batch have a mean pairwise cosine "
                "above this: the experts are collapsing into copies, lower mode_alpha. 1 never warns."})

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"MoDE variant must be one of {VARIANTS}, got {self.variant!r}.")
        if self.mode_alpha < 0:
            raise ValueError(f"mode_alpha must be >= 0, got {self.mode_alpha}.")
        if not 0 < self.collapse_cosine <= 1:
            raise ValueError(f"collapse_cosine must be in (0, 1], got {self.collapse_cosine}.")


def check_mode(model: nn.Module, variant: str) -> None:
    """Raise a clear error when `model` has no MoE experts, or when `variant='routed'` meets top-1 routing."""
    if variant not in VARIANTS:
        raise ValueError(f"MoDE variant must be one of {VARIANTS}, got {variant!r}.")
    find_experts(model)
    if variant == "routed" and model_top_k(model) == 1:
        raise ValueError(_top1_message())


def _top1_message() -> str:
    return ("MoDE variant='routed' distils among the experts that processed each token, but this model routes each token "
            "to a single expert (top-1, e.g. MiniMoE), so there is nothing to compare. Use variant='all' "
            "(MoDEConfig(variant='all') or extra_loss_terms=['mode=<alpha>'] / ['mode_all=<alpha>']; every expert then runs on every token, "
            "E x FFN compute), or a model with num_experts_per_tok >= 2.")
