"""`DistillationArguments`: `TrainingArguments` plus the knobs of knowledge distillation."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from transformers import TrainingArguments


@dataclass
class DistillationArguments(TrainingArguments):
    """Training arguments for `DistillationTrainer`.

    The training loss is ``(1 - alpha) * ce + alpha * logits_kd + hidden_loss_weight * hidden_mse
    + attention_relation_weight * attention_relation + sum(extra_loss_terms)``; terms with weight 0 are
    not computed. Every term is logged under its own name.
    """

    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Teacher checkpoint (Hub id or local folder). Not needed when a teacher model object "
                  "is passed to the trainer, or when training only from precomputed teacher logits."},
    )
    alpha: float = field(
        default=0.5,
        metadata={"help": "Weight of the logits KD term; the hard-label loss gets weight 1 - alpha."},
    )
    temperature: float = field(
        default=2.0,
        metadata={"help": "Softmax temperature T of logits KD: KL(teacher/T || student/T) * T^2."},
    )
    hidden_loss_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the hidden-state MSE term (0 disables it)."},
    )
    hidden_layer_map: str = field(
        default="uniform",
        metadata={"help": "Student -> teacher hidden-state indices for hidden MSE, as JSON '{\"1\": 2, \"2\": 4}' or "
                  "'uniform'. Index 0 is the embedding output, i the output of block i. 'uniform' maps student "
                  "block i to teacher block round(i * L_teacher / L_student)."},
    )
    attention_relation_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the MiniLMv2 self-attention relation term (Q-Q, K-K, V-V; 0 disables it)."},
    )
    relation_heads: int = field(
        default=32,
        metadata={"help": "Number of relation heads of the attention relation term; must divide both hidden sizes."},
    )
    relation_teacher_layer: int = field(
        default=-1,
        metadata={"help": "Teacher block whose Q/K/V relations are distilled (negative counts from the end)."},
    )
    relation_student_layer: int = field(
        default=-1,
        metadata={"help": "Student block that learns the relations (negative counts from the end)."},
    )
    teacher_logits_cache: str | None = field(
        default=None,
        metadata={"help": "Folder for the teacher's logits on the training set: computed once before training (keyed on "
                  "the data and the teacher's weights, reused by later runs), then KD runs no teacher forward for "
                  "logits. Terms that read teacher internals (hidden_mse, attention_relation) still run the teacher."},
    )
    task_agnostic: bool = field(
        default=False,
        metadata={"help": "Label- and logit-free distillation of intermediate representations only (e.g. stage 1 of "
                  "MiniLMv2 / MiniMoE on unlabelled text): the ce and logits_kd terms are off, whatever alpha is."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Allow writing into an existing, non-empty output_dir (refused otherwise)."},
    )
    stop_on_nonfinite_loss: bool = field(
        default=True,
        metadata={"help": "Stop training with an error naming the loss term and the step when the loss is NaN/inf "
                  "(before the optimizer step, so no NaN weights are saved)."},
    )
    allow_pickle_checkpoints: bool = field(
        default=False,
        metadata={"help": "Also load teacher/student checkpoints stored as pickle (pytorch_model.bin). Off: only "
                  "safetensors are read. Turn on only for files you trust."},
    )
    extra_loss_terms: list[str] = field(
        default_factory=list,
        metadata={"help": "More registered loss terms as 'name=weight' (see hf_moekd.distillation.LOSS_REGISTRY)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}.")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}.")
        if self.hidden_layer_map != "uniform":
            self.parsed_layer_map()  # validate early
        if self.task_agnostic and not self.loss_weights():
            raise ValueError("task_agnostic distillation has no loss term: set attention_relation_weight, "
                             "hidden_loss_weight or extra_loss_terms.")

    def parsed_layer_map(self) -> dict[int, int] | None:
        """The hidden layer map as ``{student_index: teacher_index}``, or None for 'uniform'."""
        if self.hidden_layer_map == "uniform":
            return None
        try:
            raw = json.loads(self.hidden_layer_map)
            return {int(k): int(v) for k, v in raw.items()}
        except (ValueError, AttributeError) as err:
            raise ValueError(
                f"hidden_layer_map must be 'uniform' or a JSON object like '{{\"1\": 2}}', got {self.hidden_layer_map!r}."
            ) from err

    def loss_weights(self) -> dict[str, float]:
        """Registered loss-term name -> weight, for every term with a non-zero weight."""
        weights = {} if self.task_agnostic else {"ce": 1.0 - self.alpha, "logits_kd": self.alpha}
        weights |= {
            "hidden_mse": self.hidden_loss_weight,
            "attention_relation": self.attention_relation_weight,
        }
        for spec in self.extra_loss_terms:
            name, sep, value = spec.partition("=")
            try:
                weights[name.strip()] = float(value) if sep else 1.0
            except ValueError as err:
                raise ValueError(f"extra_loss_terms entries look like 'name=0.1', got {spec!r}.") from err
        return {name: w for name, w in weights.items() if w != 0.0}
