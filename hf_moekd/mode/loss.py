"""MoDE (arXiv 2402.00893): mutual distillation among the experts of every MoE layer.

What is compared: for every MoE layer and every token, the FFN outputs ``y_1 .. y_m`` (hidden vectors ``[H]``,
*before* gate weighting) of the experts in the comparison set: all E experts (``mode="all"``, the default: every
expert runs on every token, E FFNs per token instead of k; the model's own output still uses only the routed k) or
the k experts the router sent the token to (``mode="routed"``, no extra expert compute, needs top-k >= 2).

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
from dataclasses import dataclass, field
from typing import Any, ClassVar, ContextManager, Iterator

import torch
from torch import nn
from transformers import Trainer

from ..cards import run_facts, write_model_card
from ..distillation.losses import DistillationBatch, LossTerm, batch_size, register_loss
from ..modeling.experts import ExpertCall, find_experts, model_top_k, patch_experts

MODES = ("routed", "all")


@dataclass
class MoDEConfig:
    """Settings of MoDE for `MoDETrainerMixin` (with `DistillationTrainer`, use ``extra_loss_terms=["mode=0.1"]`` or
    ``["mode=0.1,variant=routed"]``: the weight is `mode_alpha`)."""

    mode_alpha: float = field(default=0.1, metadata={"help": "Weight of the mutual-distillation loss (0 disables it)."})
    mode: str = field(
        default="all",
        metadata={"help": "'all' (default): among all experts, each run on every token (E x FFN compute); 'routed': "
                  "among the k experts that processed each token (no extra compute, needs top-k >= 2)."},
    )

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"MoDE mode must be one of {MODES}, got {self.mode!r}.")
        if self.mode_alpha < 0:
            raise ValueError(f"mode_alpha must be >= 0, got {self.mode_alpha}.")


def check_mode(model: nn.Module, mode: str) -> None:
    """Raise a clear error when `model` has no MoE experts, or when `mode='routed'` meets top-1 routing."""
    if mode not in MODES:
        raise ValueError(f"MoDE mode must be one of {MODES}, got {mode!r}.")
    find_experts(model)
    if mode == "routed" and model_top_k(model) == 1:
        raise ValueError(_top1_message())


def _top1_message() -> str:
    return ("MoDE mode='routed' distils among the experts that processed each token, but this model routes each token "
            "to a single expert (top-1, e.g. MiniMoE), so there is nothing to compare. Use mode='all' "
            "(MoDEConfig(mode='all') or extra_loss_terms=['mode=<alpha>'] / ['mode_all=<alpha>']; every expert then runs on every token, "
            "E x FFN compute), or a model with num_experts_per_tok >= 2.")


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
    """MoDE as a `DistillationTrainer` term (`extra_loss_terms=["mode=0.1"]`: all experts; `"mode=0.1,variant=routed"`:
    the routed experts only).

    Args:
        variant: 'all' (default) or 'routed'.
    """

    needs_teacher = False
    card_method = "mode"
    default_mode: ClassVar[str] = "all"

    def __init__(self, args: Any, student: nn.Module, teacher: nn.Module | None, variant: str | None = None) -> None:
        super().__init__(args, student, teacher)
        self.mode = variant or self.default_mode
        check_mode(student, self.mode)
        self._calls: list[ExpertCall] = []

    def capture(self, role: str, model: nn.Module) -> ContextManager:
        return self._record(model) if role == "student" else nullcontext()

    @contextmanager
    def _record(self, model: nn.Module) -> Iterator[None]:
        with patch_experts(model, record=self.mode) as calls:
            self._calls = calls
            yield

    def forward(self, batch: DistillationBatch) -> torch.Tensor:
        calls, self._calls = self._calls, []
        per_example = mode_loss_per_example(calls, batch_size(batch.inputs), batch.inputs.get("attention_mask"))
        return batch.per_example(per_example.sum())


@register_loss("mode_all")
class MoDEAllLoss(MoDELoss):
    """`MoDELoss` among all experts (every expert runs on every token): the default, under an explicit name."""

    default_mode = "all"


class MoDETrainerMixin:
    """Adds MoDE to a `transformers.Trainer`: ``loss = model loss + mode_alpha * MoDE`` (MoDE averaged over the
    micro-batch's examples), logged as ``loss_mode``. Use ``class MyTrainer(MoDETrainerMixin, Trainer)`` or
    `MoDETrainer`, with ``mode_config=MoDEConfig(...)``. Evaluation computes the model's loss only."""

    def __init__(self, *args: Any, mode_config: MoDEConfig | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mode_config = mode_config or MoDEConfig()
        if self.mode_config.mode_alpha:
            check_mode(self.model, self.mode_config.mode)
        self._mode_sum, self._mode_steps = 0.0, 0

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        if not model.training or not self.mode_config.mode_alpha:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        with patch_experts(model, record=self.mode_config.mode) as calls:
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        value = mode_loss_per_example(calls, batch_size(inputs), inputs.get("attention_mask")).mean()
        self._mode_sum += value.detach()
        self._mode_steps += 1
        if self._loss_already_averaged_over_accumulation(num_items_in_batch):
            value = value / self.current_gradient_accumulation_steps  # the Trainer will not divide this loss
        loss = loss + self.mode_config.mode_alpha * value
        return (loss, outputs) if return_outputs else loss

    def _loss_already_averaged_over_accumulation(self, num_items_in_batch: Any) -> bool:
        """Mirrors `Trainer.training_step`: True when it will not divide the loss by the accumulation steps."""
        if self.loss_is_scaled_for_ga is not None:
            return bool(self.loss_is_scaled_for_ga)
        return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._mode_steps:
            logs["loss_mode"] = round(float(self._mode_sum) / self._mode_steps, 6)
            self._mode_sum, self._mode_steps = 0.0, 0
        super().log(logs, start_time)

    def create_model_card(self, language: str | None = None, license: str | None = None,
                          tags: str | list[str] | None = None, model_name: str | None = None, **_: Any) -> None:
        """hf_moekd's model card (a "MoDE" method section) in output_dir/README.md, in place of transformers' own;
        push_to_hub uploads it."""
        if not self.is_world_process_zero():
            return
        args = self.args
        facts = run_facts(["mode"], student_init=getattr(self.model, "name_or_path", None) or None, hyperparameters={
            "learning_rate": args.learning_rate, "num_train_epochs": args.num_train_epochs, "seed": args.seed,
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "loss_weights": {"mode": self.mode_config.mode_alpha},
            "loss_term_options": {"mode": {"variant": self.mode_config.mode}},
        }, tags=[tags] if isinstance(tags, str) else list(tags or []))
        facts.language, facts.license = language, license
        write_model_card(args.output_dir, facts, model_id=self.hub_model_id or model_name)


class MoDETrainer(MoDETrainerMixin, Trainer):
    """`transformers.Trainer` with MoDE (pass ``mode_config=MoDEConfig(...)``)."""


__all__ = ["MODES", "MoDEAllLoss", "MoDEConfig", "MoDELoss", "MoDETrainer", "MoDETrainerMixin", "check_mode",
           "mode_loss_per_example", "mutual_distillation", "real_tokens"]
