"""m2mKD settings (`M2MConfig`): how teacher and student are cut, how the meta model starts, how the KD term is
scaled, whether the module phase keeps the student's gate loss, and how an end-to-end baseline is given the same
budget. The image study's `M2MArguments` extends it.

The defaults are the official recipe (kamanphoebe/m2mKD, commit 067fa1f; file:line as read there):

* Meta model from scratch (`meta_init="scratch"`). TRAIN-MOE.md, "Preparation phase", step 1 (lines 22-26) trains
  it as its own phase: `main.py --phase PT --model vit_large_patch16_224 --divided_depths 1 1 1 1 --epochs 300`,
  then freezes it (`--meta_ckpt_path` of the MT phase, TRAIN-MOE.md line 32, and of the m2mKD phase, line 58).
  deep_incubation/main.py builds that model with `create_model(args.model, pretrained=False, ...)` (lines 301-309)
  and loads nothing into it in PT (`--finetune` defaults to '', line 151; `load_meta` runs only in MT, line 369,
  and m2mKD, line 414). PT lasts 300 epochs, 3x the 100 epochs of each module's m2mKD phase (TRAIN-MOE.md line 59).
  `meta_init="teacher"` (the teacher's stem, head and the first block of each teacher module; this project's
  default before issue 29) is an option.
* No gate (load-balancing) loss in the module phase (`module_gate_loss=False`). deep_incubation/losses.py
  `m2mKDLoss.forward` (lines 139-169) returns `base_loss * alpha_student + teacher_loss * alpha_teacher` and
  nothing else; deep_incubation/engine.py (lines 40-42) back-propagates exactly that. The V-MoE's gate is fmoe's
  `NaiveGate` (vmoe.py lines 7, 74, 89-90) and `VMoE.get_gate_loss` (vmoe.py lines 234-240) is never called.
  `module_gate_loss=True` adds the student's own balancing loss (`config.router_aux_loss_coef`), as this project
  did before issue 29.
* The KD term: see `kd_scale` (deep_incubation/losses.py lines 157-168).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .modules import META_INITS

BUDGETS = ("forwards", "blocks")
KD_SCALES = {"logit": "logit", "example": "item"}  # kd_scale -> the `per` option of the logits_kd loss term


@dataclass
class M2MConfig:
    """Settings of the m2mKD method itself (the data, models and schedules belong to the study's arguments)."""

    num_modules: int = field(default=4, metadata={"help": "Modules N the teacher and the student are cut into (one meta block each)."})
    meta_init: str = field(default="scratch", metadata={"help": "Meta model start: `scratch` (official: a fresh model, pre-trained on the task) or `teacher` (its stem, head and first block of each module)."})
    budget: str = field(default="forwards", metadata={"help": "How the baseline matches m2mKD's budget: `forwards` (a pass through one student module counts as a full student forward pass; conservative) or `blocks` (it counts as the module's share of the student's blocks)."})
    module_gate_loss: bool = field(default=False, metadata={"help": "Add the student's load-balancing loss (weight: its config's router_aux_loss_coef) to the loss of each module's m2mKD phase; the official m2mKD has none."})
    kd_scale: str = field(default="logit", metadata={"help": "`logit` (official m2mKD / DeiT: the summed KL divided by batch x classes) or `example` (divided by the batch only: at the same alpha the KD term weighs `classes` times more)."})

    def __post_init__(self) -> None:
        if self.kd_scale not in KD_SCALES:
            raise ValueError(f"kd_scale must be 'logit' or 'example', got {self.kd_scale!r}.")
        if self.budget not in BUDGETS:
            raise ValueError(f"budget {self.budget!r} is unknown; choose one of {BUDGETS}.")
        if self.meta_init not in META_INITS:
            raise ValueError(f"meta_init {self.meta_init!r} is unknown; choose one of {META_INITS}.")
        if self.num_modules < 1:
            raise ValueError(f"num_modules must be >= 1, got {self.num_modules}.")

    @property
    def logits_kd_options(self) -> dict[str, str]:
        """The options of the module runs' `logits_kd` term that `kd_scale` stands for."""
        return {"per": KD_SCALES[self.kd_scale]}
