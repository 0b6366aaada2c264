"""MoDE settings (`MoDEConfig`) and the check that a model can be trained with them."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..model_utils.experts import find_experts, model_top_k

VARIANTS = ("routed", "all")


@dataclass
class MoDEConfig:
    """Settings of MoDE for `MoDETrainerMixin` (with `DistillationTrainer`, use ``extra_loss_terms=["mode=0.1"]`` or
    ``["mode=0.1,variant=routed"]``: the weight is `mode_alpha`)."""

    mode_alpha: float = field(default=0.1, metadata={"help": "Weight of the mutual-distillation loss (0 disables it)."})
    variant: str = field(
        default="all",
        metadata={"help": "'all' (default): among all experts, each run on every token (E x FFN compute); 'routed': "
                  "among the k experts that processed each token (no extra compute, needs top-k >= 2)."},
    )

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"MoDE variant must be one of {VARIANTS}, got {self.variant!r}.")
        if self.mode_alpha < 0:
            raise ValueError(f"mode_alpha must be >= 0, got {self.mode_alpha}.")


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
