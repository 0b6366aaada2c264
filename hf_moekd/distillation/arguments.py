"""`DistillationArguments`: `TrainingArguments` plus the knobs of knowledge distillation."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainingArguments

from ..utils.teachers import resolve_model_path

_DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")  # transformers' named device maps
LOSS_FIELDS = ("alpha", "temperature", "kd_divergence", "jsd_beta", "kd_chunk_size", "hidden_loss_weight",
               "hidden_layer_map", "attention_relation_weight", "relation_heads", "relation_teacher_layer",
               "relation_student_layer", "relation_student_source", "relation_dropout", "extra_loss_terms",
               "fused_lm_kd")
"""The fields that define the training loss (its terms, their weights and settings): `loss_settings`."""


@dataclass
class DistillationArguments(TrainingArguments):
    """Training arguments for `DistillationTrainer`.

    The training loss is ``(1 - alpha) * ce + alpha * logits_kd + hidden_loss_weight * hidden_mse
    + attention_relation_weight * attention_relation + sum(extra_loss_terms)``; terms with weight 0 are
    not computed. Every term is logged under its own name.

    Subclasses (e.g. the image studies' `hf_moekd.studies.vision.ImageArguments`) add their own fields and may
    override a field's default by declaring it again; the loss fields are defined here only.
    """

    _argument_group_name = "distillation"  # HfArgumentParser: these flags under one heading

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
    kd_divergence: str = field(
        default="forward_kl",
        metadata={"help": "Divergence of logits KD: 'forward_kl' KL(teacher || student), 'reverse_kl' KL(student || "
                  "teacher), or 'jsd', trl GKD's generalised Jensen-Shannon divergence with jsd_beta (all times T^2)."},
    )
    jsd_beta: float = field(
        default=0.5,
        metadata={"help": "beta of kd_divergence='jsd' (trl's GKD `beta`): 0 is forward KL, 1 reverse KL."},
    )
    kd_chunk_size: int = field(
        default=128,
        metadata={"help": "Token positions per chunk of the KD divergence on token-level logits (LMs): bounds the "
                  "float32 softmax copies to chunk x vocab instead of batch x sequence x vocab (peak memory against the unchunked "
                  "loss: benchmarks/lm_kd_memory.py, docs/results/lm_kd_memory.md). The fused LM path "
                  "(fused_lm_kd) takes at most 2**24 // vocab positions per chunk (110 at vocab 151,936)."},
    )
    fused_lm_kd: bool = field(
        default=True,
        metadata={"help": "Language models (causal LM, seq2seq): compute logits KD and CE from the final hidden states "
                  "and the lm_head weight, kd_chunk_size positions at a time, so that neither model's [batch, seq, "
                  "vocab] logits exist (hf_moekd.distillation.fused). Falls back, with one log line, for heads that "
                  "are not a dense [vocab, hidden] torch.nn.Linear. False: the models' full logits, as before."},
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
    relation_student_source: str = field(
        default="final_hidden",
        metadata={"help": "Where the student's relations come from: 'final_hidden' (official MiniMoE: this term's own "
                  "Q/K/V linears over the hidden states of relation_student_layer, so every block learns) or 'block' "
                  "(MiniLMv2: that block's own Q/K/V projections)."},
    )
    relation_dropout: float | None = field(
        default=None,
        metadata={"help": "Dropout on the student's relation probabilities in training, as the official MiniMoE "
                  "student (nn.Dropout(attention_probs_dropout_prob) on its Q-Q/K-K/V-V probabilities, then "
                  "log(p + 1e-7)). Default: the student's attention_probs_dropout_prob; 0 disables it."},
    )
    teacher_logits_cache: str | None = field(
        default=None,
        metadata={"help": "Folder for the teacher's logits on the training set: computed once before training (keyed on "
                  "the data and the teacher's weights, reused by later runs), then KD runs no teacher forward for "
                  "logits. Terms that read teacher internals (hidden_mse, attention_relation) still run the teacher."},
    )
    teacher_logits_top_k: int = field(
        default=64,
        metadata={"help": "Language-model students (causal LM, seq2seq): the teacher-logits cache keeps the top k "
                  "log-probs per token (float16, at the run's temperature) and their token ids (int32) instead of the "
                  "full vocabulary; logits KD then uses those k plus one bucket for the rest of the mass (forward KL). "
                  "0: cache full logits."},
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
    teacher_device_map: str | None = field(
        default=None,
        metadata={"help": "Load the teacher with this device_map (accelerate big-model dispatch) for a teacher larger "
                  "than one device: 'auto', 'balanced', 'balanced_low_0', 'sequential', a device ('cpu', 'cuda:0') or "
                  "a JSON object '{\"module.name\": 0 | \"cpu\" | \"disk\"}'. A teacher spread over several "
                  "devices or offloaded is not moved to the student's device. Only with teacher_model_name_or_path, "
                  "one process per machine, and not with DeepSpeed ZeRO-3 (which partitions the teacher itself)."},
    )
    extra_loss_terms: list[str] = field(
        default_factory=list,
        metadata={"help": "More registered loss terms as 'name=weight' or 'name=weight,option=value,...', e.g. "
                  "'mode=0.01,variant=all' (see hf_moekd.distillation.LOSS_REGISTRY and the hf_moekd.loss_terms "
                  "entry points)."},
    )
    peft_config: str | None = field(  # in Python also a peft.PeftConfig; a path becomes one in __post_init__
        default=None,
        metadata={"help": "Train peft adapters (LoRA, ...) on the student instead of all its weights: the path of a "
                  "JSON adapter config (adapter_config.json as peft writes it, or the folder holding one), or the "
                  "JSON itself, e.g. '{\"peft_type\": \"LORA\", \"r\": 8, \"target_modules\": [\"query\", \"value\"], "
                  "\"task_type\": \"SEQ_CLS\"}'. In Python a peft.PeftConfig works too. A PeftModel student is used "
                  "as is."},
    )
    merge_adapters: bool = field(
        default=False,
        metadata={"help": "With peft adapters: save the final model with the adapters merged into its weights (a stock "
                  "checkpoint) instead of the adapter alone. Training checkpoints keep the adapter."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.deepspeed:  # before any model is loaded under ZeRO-3 (zero.Init)
            from .engines import ensure_deepspeed_comm

            ensure_deepspeed_comm()
        if self.teacher_model_name_or_path:
            self.teacher_model_name_or_path = resolve_model_path(self.teacher_model_name_or_path)  # the minilm-l6 alias
        self.teacher_load_kwargs()  # validate early
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}.")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}.")
        if self.kd_divergence not in ("forward_kl", "reverse_kl", "jsd"):
            raise ValueError(f"kd_divergence must be 'forward_kl', 'reverse_kl' or 'jsd', got {self.kd_divergence!r}.")
        if not 0.0 <= self.jsd_beta <= 1.0:
            raise ValueError(f"jsd_beta must be in [0, 1], got {self.jsd_beta}.")
        if self.teacher_logits_top_k < 0:
            raise ValueError(f"teacher_logits_top_k must be >= 0 (0: full logits), got {self.teacher_logits_top_k}.")
        if self.kd_chunk_size < 1:
            raise ValueError(f"kd_chunk_size must be >= 1, got {self.kd_chunk_size}.")
        if self.relation_student_source not in ("final_hidden", "block"):
            raise ValueError(f"relation_student_source must be 'final_hidden' or 'block', got "
                             f"{self.relation_student_source!r}.")
        if self.relation_dropout is not None and not 0.0 <= self.relation_dropout < 1.0:
            raise ValueError(f"relation_dropout must be in [0, 1) or None (the student's attention dropout), got "
                             f"{self.relation_dropout}.")
        if self.hidden_layer_map != "uniform":
            self.parsed_layer_map()  # validate early
        if self.task_agnostic and not self.loss_weights():
            raise ValueError("task_agnostic distillation has no loss term: set attention_relation_weight, "
                             "hidden_loss_weight or extra_loss_terms.")
        if self.peft_config is not None:
            from ..integrations.peft import load_peft_config

            self.peft_config = load_peft_config(self.peft_config)  # fail early on a bad file

    def to_dict(self) -> dict:
        data = super().to_dict()
        if self.peft_config is not None and not isinstance(self.peft_config, str):
            from ..integrations.peft import peft_config_dict

            data["peft_config"] = peft_config_dict(self.peft_config)
        return data

    def loss_settings(self) -> dict[str, Any]:
        """The fields that define the training loss (`LOSS_FIELDS`), e.g. to give another run the same loss."""
        return {name: getattr(self, name) for name in LOSS_FIELDS}

    def teacher_load_kwargs(self) -> dict[str, object]:
        """Extra `from_pretrained` arguments for the teacher: the parsed `teacher_device_map`, if any."""
        if not self.teacher_device_map:
            return {}
        text = self.teacher_device_map.strip()
        try:
            device_map = json.loads(text) if text.startswith("{") else text
            if isinstance(device_map, str) and device_map not in _DEVICE_MAP_STRATEGIES:  # then a device string
                if torch.device(device_map).type == "meta":  # (torch.device raises RuntimeError on any other text)
                    raise ValueError("the meta device holds no weights")
        except (ValueError, RuntimeError) as err:
            raise ValueError(f"teacher_device_map must be {', '.join(map(repr, _DEVICE_MAP_STRATEGIES))}, a device "
                             f"('cpu', 'cuda', 'cuda:1', ...) or a JSON object, got {self.teacher_device_map!r}."
                             ) from err
        from transformers.integrations import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():
            raise ValueError("teacher_device_map does not work with DeepSpeed ZeRO-3, which already partitions the "
                             "teacher over the processes: drop teacher_device_map (or use ZeRO-2 / no DeepSpeed).")
        if self.world_size > 1:
            raise ValueError(f"teacher_device_map spreads one teacher over all devices of the machine, but this run "
                             f"has {self.world_size} processes: run one process, or use DeepSpeed ZeRO-3 "
                             "(examples/configs/zero3.json) to partition the teacher across processes.")
        return {"device_map": device_map}

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

    def loss_term_specs(self) -> dict[str, tuple[float, dict[str, Any]]]:
        """Registered loss-term name -> (weight, options), for every term with a non-zero weight.

        `extra_loss_terms` entries are 'name=weight' followed by the term's options, e.g. 'mode=0.01,variant=all'
        or 'mpo_constraint=1e-4,layer_map={"0": 0, "1": 2}' (values are read as JSON where they parse, else text).
        """
        specs: dict[str, tuple[float, dict[str, Any]]] = {}
        if not self.task_agnostic:
            specs |= {"ce": (1.0 - self.alpha, {}), "logits_kd": (self.alpha, {})}
        specs |= {"hidden_mse": (self.hidden_loss_weight, {}),
                  "attention_relation": (self.attention_relation_weight, {})}
        for spec in self.extra_loss_terms:
            name, weight, options = parse_term_spec(spec)
            specs[name] = (weight, options)
        return {name: spec for name, spec in specs.items() if spec[0] != 0.0}

    def loss_weights(self) -> dict[str, float]:
        """Registered loss-term name -> weight, for every term with a non-zero weight."""
        return {name: weight for name, (weight, _) in self.loss_term_specs().items()}


def parse_term_spec(spec: str) -> tuple[str, float, dict[str, Any]]:
    """'name=weight,key=value,...' -> (name, weight, options); 'name' alone has weight 1."""
    head, *rest = _split_top_level(spec)
    name, sep, value = head.partition("=")
    try:
        weight = float(value) if sep else 1.0
    except ValueError as err:
        raise ValueError(f"extra_loss_terms entries look like 'name=0.1' or 'name=0.1,option=value', got {spec!r}."
                         ) from err
    options: dict[str, Any] = {}
    for item in rest:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"loss term option {item!r} in {spec!r} is not 'key=value'.")
        try:
            options[key.strip()] = json.loads(raw)
        except ValueError:
            options[key.strip()] = raw.strip()
    return name.strip(), weight, options


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside JSON brackets and braces."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [*parts, text[start:]]
