"""MoDE (arXiv 2402.00893): mutual distillation among the experts of every MoE layer.

What is compared: for every MoE layer and every token, the FFN outputs ``y_1 .. y_m`` (hidden vectors ``[H]``,
*before* gate weighting) of the experts in the comparison set: all E experts (``variant="all"``, the default: every
expert runs on every token, E FFNs per token instead of k; the model's own output still uses only the routed k) or
the k experts the router sent the token to (``variant="routed"``, no extra expert compute, needs top-k >= 2).

Why ``all`` is the default: the paper's mechanism (abstract) is that each expert "picks up more features learned by
other experts" from samples the gate allocated to them, which an expert only sees when it runs on them; in
``routed`` mode an expert never sees the samples routed elsewhere. The paper's exact loss (which outputs, which
divergence, which weighting) is not in the sources available here, so the divergence below is our choice.

Divergence: each expert's output is pulled toward the mean of the others', in relative squared error,
``l_token = 1/m * sum_j mean_h (y_j - sg(mean_{i != j} y_i))^2 / sg(1/m * sum_j mean_h y_j^2)``. Expert outputs are
hidden vectors (summands of the residual stream), not distributions, so a KL needs an arbitrary softmax over features;
a squared error compares them as they are. Dividing by the (detached) mean squared size of the outputs makes the loss
scale-free: it is ~1-2 for unrelated experts and 0 for identical ones whatever the outputs' size, so one alpha means the
same early and late in training and across models (a plain MSE follows the outputs' size, ~1e-5 at initialisation).
``sg`` is stop-gradient: the target side and the scale are detached, as in deep mutual learning / KD, so an expert learns
from its peers without being moved by the loss terms in which it serves as their target; gradients reach each
participating expert only through its own output, ``d l / d y_j = 2 / (m H s) * (y_j - mean_{i != j} y_i)`` with ``s``
the scale. These gradients sum to 0 over j: MoDE shrinks the experts' spread around their mean output and never moves
the mean itself.

Normalisation: ``l_token`` is averaged over an example's real tokens (``attention_mask``), then over MoE layers; the
result is a per-example value (summed over examples by `MoDELoss`, averaged by `MoDETrainerMixin`). All experts equal
gives 0 (up to rounding).
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import ClassVar, ContextManager, Iterator

import torch
from torch import nn

from ..distillation.losses import DistillationBatch, LossTerm, batch_size, register_loss
from .collapse import CollapseWatch
from .config import _top1_message, check_mode
from ..model_utils.experts import ExpertCall, patch_experts


def mutual_distillation(outputs: torch.Tensor) -> torch.Tensor:
    """Per-token loss ``[N]`` from expert outputs ``[N, m, H]``: mean over the m experts of MSE(y_j, detached mean
    of the other m - 1), relative to the detached mean squared size of the m outputs."""
    m = outputs.shape[1]
    if m < 2:
        raise ValueError(_top1_message())
    y = outputs.float()
    others = ((y.sum(1, keepdim=True) - y) / (m - 1)).detach()
    scale = y.detach().pow(2).mean((1, 2)).clamp_min(1e-12)
    return (y - others).pow(2).mean(-1).mean(-1) / scale


def real_tokens(n_tokens: int, n_examples: int, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """``[B, S]`` boolean mask of real tokens for ``N = B * S`` flattened tokens (all real without a matching mask)."""
    if n_tokens % n_examples:
        raise ValueError(f"{n_tokens} routed tokens do not split into {n_examples} examples of equal length.")
    seq = n_tokens // n_examples
    if attention_mask is not None and tuple(attention_mask.shape) == (n_examples, seq):
        return attention_mask.bool()
    return torch.ones(n_examples, seq, dtype=torch.bool)


def mode_loss_per_example(calls: list[ExpertCall], n_examples: int,
                          attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``[B]``: the MoDE loss of each example (mean over its real tokens, then over MoE layers)."""
    if not calls:
        raise ValueError("No MoE experts ran during the forward pass, so there is no MoDE loss to compute.")
    total = 0.0
    for call in calls:
        per_token = mutual_distillation(call.outputs)
        mask = real_tokens(per_token.shape[0], n_examples, attention_mask).to(per_token.device).float()
        per_token = per_token.view(mask.shape)
        total = total + (per_token * mask).sum(1) / mask.sum(1).clamp_min(1)
    return total / len(calls)


@register_loss("mode")
class MoDELoss(LossTerm):
    """MoDE as a `DistillationTrainer` term (`extra_loss_terms=["mode=0.003"]`: all experts; `"mode=0.003,variant=routed"`:
    the routed experts only).

    Args:
        variant: 'all' (default) or 'routed'.
    """

    needs_teacher = False
    card_method = "mode"
    default_variant: ClassVar[str] = "all"

    def __init__(self, student: nn.Module | None = None, teacher: nn.Module | None = None, *,
                 variant: str | None = None) -> None:
        super().__init__()
        if student is None:
            raise ValueError("the mode loss term needs the student model (its MoE experts).")
        self.variant = variant or self.default_variant
        check_mode(student, self.variant)
        self.collapse = CollapseWatch()
        self._calls: list[ExpertCall] = []

    def capture(self, role: str, model: nn.Module) -> ContextManager:
        return self._record(model) if role == "student" else nullcontext()

    @contextmanager
    def _record(self, model: nn.Module) -> Iterator[None]:
        with patch_experts(model, record=self.variant) as calls:
            self._calls = calls
            yield

    def forward(self, batch: DistillationBatch) -> torch.Tensor:
        calls, self._calls = self._calls, []
        self.collapse.observe(calls)
        per_example = mode_loss_per_example(calls, batch_size(batch.inputs), batch.inputs.get("attention_mask"))
        return batch.per_example(per_example.sum())


@register_loss("mode_all")
class MoDEAllLoss(MoDELoss):
    """`MoDELoss` among all experts (every expert runs on every token): the default, under an explicit name."""

    default_variant = "all"
