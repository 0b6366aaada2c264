"""m2mKD settings (`M2MConfig`): how teacher and student are cut, how the meta model starts, how the KD term is
scaled and how an end-to-end baseline is given the same budget. The image study's `M2MArguments` extends it."""
from __future__ import annotations

from dataclasses import dataclass, field

from .modules import META_INITS

BUDGETS = ("forwards", "blocks")
KD_SCALES = {"logit": "logit", "example": "item"}  # kd_scale -> the `per` option of the logits_kd loss term


@dataclass
class M2MConfig:
    """Settings of the m2mKD method itself (the data, models and schedules belong to the study's arguments)."""

    num_modules: int = field(default=4, metadata={"help": "Modules N the teacher and the student are cut into (one meta block each)."})
    meta_init: str = field(default="teacher", metadata={"help": "Meta model start: `teacher` (its stem, head and first block of each module) or `scratch`."})
    budget: str = field(default="forwards", metadata={"help": "How the baseline matches m2mKD's budget: `forwards` (a pass through one student module counts as a full student forward pass; conservative) or `blocks` (it counts as the module's share of the student's blocks)."})
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
