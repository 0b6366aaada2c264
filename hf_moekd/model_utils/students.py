"""Build dense students from a teacher: a layer subset of it, or a smaller randomly initialised copy."""
from __future__ import annotations

import copy
from typing import Sequence

from torch import nn
from transformers import PreTrainedModel

from .capture import find_blocks


TEACHER_LAYERS_ATTR = "hf_moekd_teacher_layers"  # on the student object: student block i = teacher block layers[i]


def student_from_teacher_layers(teacher: PreTrainedModel, layers: Sequence[int]) -> PreTrainedModel:
    """A student of the same class whose blocks are copies of the teacher's blocks `layers` (in order).

    Embeddings, pooler and head are copied too, e.g. ``layers=[0, 2, 4]`` gives a 3-layer student from a
    6-layer teacher (the initialisation of DistilBERT-style students).
    """
    blocks = find_blocks(teacher)
    if not layers or any(not 0 <= i < len(blocks) for i in layers):
        raise ValueError(f"Student layers {list(layers)} must be a non-empty subset of the teacher's 0..{len(blocks) - 1}.")
    student = copy.deepcopy(teacher)
    kept = nn.ModuleList(copy.deepcopy(blocks[i]) for i in layers)
    _replace_module(student, find_blocks(student), kept)
    student.config.num_hidden_layers = len(layers)
    student.requires_grad_(True)
    setattr(student, TEACHER_LAYERS_ATTR, list(layers))
    return student


def teacher_layers_of(model: nn.Module) -> list[int] | None:
    """The teacher blocks a `student_from_teacher_layers` student was cut from (in its order), else None."""
    return getattr(model, TEACHER_LAYERS_ATTR, None)


def _replace_module(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for name, module in root.named_modules():
        for child_name, child in module.named_children():
            if child is old:
                setattr(module, child_name, new)
                return
    raise ValueError("module to replace not found")


def smaller_config(config, **overrides):
    """A copy of `config` with `overrides` (e.g. hidden_size=192, num_hidden_layers=4), checked for consistency."""
    config = copy.deepcopy(config)
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise ValueError(f"{type(config).__name__} has no field {key!r}.")
        setattr(config, key, value)
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(
            f"hidden_size {config.hidden_size} is not divisible by num_attention_heads {config.num_attention_heads}."
        )
    return config


def parse_overrides(spec: str) -> dict[str, int | float | str]:
    """'hidden_size=192,num_hidden_layers=4' -> {'hidden_size': 192, 'num_hidden_layers': 4}."""
    out: dict[str, int | float | str] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"Config overrides look like 'hidden_size=192,num_hidden_layers=4', got {item!r}.")
        for cast in (int, float):
            try:
                out[key.strip()] = cast(value)
                break
            except ValueError:
                continue
        else:
            out[key.strip()] = value
    return out
