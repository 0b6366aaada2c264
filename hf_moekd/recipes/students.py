"""The student recipe of the text tasks: which checkpoint, which blocks or config, and which method's surgery
(MiniMoE experts, OPDF's MPO over-parameterisation) before training."""
from __future__ import annotations

import contextlib
from typing import Any

from transformers import AutoTokenizer, PreTrainedModel

from ..distillation.engines import full_weights_load
from ..models.minimoe import minimoe_from_dense
from ..model_utils.auto import from_pretrained_with_new_head
from ..model_utils.students import parse_overrides, smaller_config, student_from_teacher_layers
from ..opdf import contract_overparameterized, overparameterize
from .arguments import ModelArguments
from ..utils.teachers import check_local_folder, resolve_model_path
from ..utils.outputs import check_weights


def build_model(model_args: ModelArguments, auto_class: type, allow_pickle: bool = False,
                **head_kwargs: Any) -> tuple[PreTrainedModel, Any]:
    """Load the tokenizer and the (student) model described by `model_args` (safetensors only unless `allow_pickle`)."""
    path = resolve_model_path(model_args.model_name_or_path)
    check_local_folder(path, "Student (--model_name_or_path)")
    check_weights(path, allow_pickle, "--allow_pickle_checkpoints true")
    if model_args.student_layers and model_args.student_config_overrides:
        raise ValueError("Use either --student_layers or --student_config_overrides, not both.")
    tokenizer = AutoTokenizer.from_pretrained(path)
    surgery = (model_args.student_layers or model_args.student_config_overrides or model_args.moe_experts
               or model_args.mpo_overparameterize)
    with full_weights_load() if surgery else contextlib.nullcontext():  # ZeRO-3: partitioned when DeepSpeed starts
        model = from_pretrained_with_new_head(auto_class, path, use_safetensors=None if allow_pickle else True,
                                              **head_kwargs)
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
        contract_overparameterized(model)
    return model
