"""The student recipe of the text tasks: which checkpoint, which blocks or config, and which method's surgery
(MiniMoE experts, OPDF's MPO over-parameterisation) before training."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable

from transformers import AutoConfig, AutoTokenizer, PreTrainedModel

from ..distillation.engines import full_weights_load
from ..models.minimoe import minimoe_from_dense
from ..model_utils.auto import from_pretrained_with_new_head
from ..model_utils.students import parse_overrides, smaller_config, student_from_teacher_layers
from ..opdf import contract_overparameterized, overparameterize
from .arguments import ModelArguments
from ..utils.teachers import check_local_folder, resolve_model_path
from ..utils.outputs import check_weights, checkpoint_format


def build_model(model_args: ModelArguments, auto_class: type, allow_pickle: bool = False,
                load_processor: Callable[[str, Any], Any] | None = None,
                **head_kwargs: Any) -> tuple[PreTrainedModel, Any]:
    """Load the (student) model described by `model_args` (safetensors only unless `allow_pickle`) and its processor:
    the checkpoint's tokenizer, or `load_processor(path, model.config)` (images: see `tasks.images.ImagePixels`).
    A local folder with a config.json and no weights gives a randomly initialised model of that config."""
    path = resolve_model_path(model_args.model_name_or_path)
    check_local_folder(path, "Student (--model_name_or_path)")
    check_weights(path, allow_pickle, "--allow_pickle_checkpoints true")
    if model_args.student_layers and model_args.student_config_overrides:
        raise ValueError("Use either --student_layers or --student_config_overrides, not both.")
    tokenizer = AutoTokenizer.from_pretrained(path) if load_processor is None else None
    surgery = (model_args.student_layers or model_args.student_config_overrides or model_args.moe_experts
               or model_args.mpo_overparameterize)
    with full_weights_load() if surgery else contextlib.nullcontext():  # ZeRO-3: partitioned when DeepSpeed starts
        model = _load(model_args.model_name_or_path, path, auto_class, allow_pickle, **head_kwargs)
        if model_args.student_layers:
            layers = [int(i) for i in model_args.student_layers.split(",")]
            model = student_from_teacher_layers(model, layers)
        elif model_args.student_config_overrides:
            config = smaller_config(model.config, **parse_overrides(model_args.student_config_overrides))
            model = auto_class.from_config(config)
        if model_args.moe_experts:
            random_start = bool(model_args.student_config_overrides) or _config_only(path)
            expert_init = model_args.moe_expert_init or ("moefy" if random_start else "copy")
            model = minimoe_from_dense(model, num_ffn_experts=model_args.moe_experts, distinct_init=expert_init)
        elif model_args.moe_expert_init:
            raise ValueError("--moe_expert_init needs --moe_experts.")
        if model_args.mpo_overparameterize:
            overparameterize(model, gauge=model_args.mpo_gauge)
    if surgery:
        model.name_or_path = ""  # its weights are no checkpoint's (peft adapters then name no base model)
    if load_processor is not None:
        tokenizer = load_processor(path, model.config)
    return model, tokenizer


def _load(name: str, path: str, auto_class: type, allow_pickle: bool, **head_kwargs: Any) -> PreTrainedModel:
    """The checkpoint at `path`, or a random model of its config when the folder has no weights."""
    try:
        if not _config_only(path):
            return from_pretrained_with_new_head(auto_class, path, use_safetensors=None if allow_pickle else True,
                                                 **head_kwargs)
        print(f"{path} holds a config.json and no weights: the student starts from random weights")
        return auto_class.from_config(AutoConfig.from_pretrained(path, **head_kwargs))
    except ValueError as err:
        if "Unrecognized configuration class" not in str(err):
            raise
        kind = AutoConfig.from_pretrained(path).model_type
        raise ValueError(f"--model_name_or_path {name} is a {kind} model, which {auto_class.__name__} cannot load: "
                         "pass a checkpoint, or a folder with a config.json, of a model for this task") from None


def _config_only(path: str) -> bool:
    """A local folder with a config.json and no weight files."""
    return (Path(path) / "config.json").is_file() and checkpoint_format(path) is None


def model_for_saving(model: PreTrainedModel, model_args: ModelArguments) -> PreTrainedModel:
    """The model as it should be saved: MPO cores contracted back to plain linears."""
    if model_args.mpo_overparameterize:
        contract_overparameterized(model)
    return model
