"""MoDE for any `transformers.Trainer`: `MoDETrainerMixin` and `MoDETrainer`."""
from __future__ import annotations

from typing import Any

from torch import nn
from transformers import Trainer

from ..cards import run_facts, write_model_card
from ..distillation.losses import batch_size
from .collapse import CollapseWatch
from .config import MoDEConfig, check_mode
from .losses import mode_loss_per_example
from ..model_utils.experts import patch_experts


class MoDETrainerMixin:
    """Adds MoDE to a `transformers.Trainer`: ``loss = model loss + mode_alpha * MoDE`` (MoDE averaged over the
    micro-batch's examples), logged as ``loss_mode``. Use ``class MyTrainer(MoDETrainerMixin, Trainer)`` or
    `MoDETrainer`, with ``mode_config=MoDEConfig(...)``. Evaluation computes the model's loss only."""

    def __init__(self, *args: Any, mode_config: MoDEConfig | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mode_config = mode_config or MoDEConfig()
        if self.mode_config.mode_alpha:
            check_mode(self.model, self.mode_config.variant)
        self._mode_sum, self._mode_steps = 0.0, 0
        self._collapse = CollapseWatch(self.mode_config.collapse_cosine)

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        if not model.training or not self.mode_config.mode_alpha:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        with patch_experts(model, record=self.mode_config.variant) as calls:
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        value = mode_loss_per_example(calls, batch_size(inputs), inputs.get("attention_mask")).mean()
        self._collapse.observe(calls)
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
            "loss_term_options": {"mode": {"variant": self.mode_config.variant}},
        }, tags=[tags] if isinstance(tags, str) else list(tags or []))
        facts.language, facts.license = language, license
        write_model_card(args.output_dir, facts, model_id=self.hub_model_id or model_name)


class MoDETrainer(MoDETrainerMixin, Trainer):
    """`transformers.Trainer` with MoDE (pass ``mode_config=MoDEConfig(...)``)."""
