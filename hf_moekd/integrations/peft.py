"""PEFT students (LoRA and the other peft methods): adapter configs, wrapping, merging, adapter folders."""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from ..model_utils.auto import auto_class_like

if TYPE_CHECKING:
    from peft import PeftConfig, PeftModel

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILES = (ADAPTER_CONFIG, "adapter_model.safetensors", "adapter_model.bin")
_EXAMPLE = '{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["query", "value"]}'


def is_peft_model(model: Any) -> bool:
    """True for a `peft.PeftModel` (LoRA-wrapped student, ...)."""
    from peft import PeftModel

    return isinstance(model, PeftModel)


def is_adapter_folder(path: Any) -> bool:
    """True for a folder holding a saved adapter (adapter_config.json) rather than a whole model."""
    return isinstance(path, (str, os.PathLike)) and (Path(path).expanduser() / ADAPTER_CONFIG).is_file()


def load_peft_config(value: PeftConfig | dict | str | os.PathLike) -> PeftConfig:
    """A peft config from an instance, a dict, JSON text, or the path of an adapter_config.json (or of its folder).

    Configs read from a file or dict get ``inference_mode=False`` (peft saves adapters with True), so they train.
    """
    from peft import PeftConfig
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    if isinstance(value, PeftConfig):
        return value
    if isinstance(value, str) and value.lstrip().startswith("{"):
        try:
            value = json.loads(value)
        except ValueError as err:
            raise ValueError(f"peft_config is not valid JSON ({err}); it should look like {_EXAMPLE}") from err
    if isinstance(value, (str, os.PathLike)):
        path = Path(value).expanduser()
        path = path / ADAPTER_CONFIG if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"peft_config {str(value)!r} is not a file: pass the path of an "
                                    "adapter_config.json (as written by PeftModel.save_pretrained or "
                                    "LoraConfig(...).save_pretrained(folder)) or of the folder holding one, e.g. a "
                                    f"file containing {_EXAMPLE}")
        try:
            data = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise ValueError(f"peft_config {path} is not valid JSON ({err}); it should hold an adapter config like "
                             f"{_EXAMPLE}") from err
        where = str(path)
    elif isinstance(value, dict):
        data, where = dict(value), "peft_config"
    else:
        raise ValueError(f"peft_config must be a peft.PeftConfig, a dict or the path of an adapter_config.json, got "
                         f"{type(value).__name__}")
    if not isinstance(data, dict) or "peft_type" not in data:
        raise ValueError(f"{where} has no 'peft_type': an adapter config looks like {_EXAMPLE}")
    peft_type = str(getattr(data["peft_type"], "value", data["peft_type"])).upper()
    config_cls = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    if config_cls is None:
        raise ValueError(f"{where}: unknown peft_type {data['peft_type']!r}; choose from "
                         f"{', '.join(sorted(str(t.value) for t in PEFT_TYPE_TO_CONFIG_MAPPING))}")
    names = {f.name for f in dataclasses.fields(config_cls) if f.init}
    data.pop("runtime_config", None)  # runtime only, never saved
    auto_mapping = data.pop("auto_mapping", None)
    if unknown := sorted(set(data) - names):
        raise ValueError(f"{where}: {config_cls.__name__} has no field(s) {unknown}; fix the names (see the "
                         f"{config_cls.__name__} documentation) or upgrade peft if the file was written by a newer one")
    try:
        config = config_cls(**{**data, "peft_type": peft_type, "inference_mode": False})
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where} is not a valid {config_cls.__name__}: {err}") from err
    config.auto_mapping = auto_mapping
    return config


def peft_config_dict(config: PeftConfig) -> dict[str, Any]:
    """The config as JSON-ready data (sets become sorted lists), as in adapter_config.json."""
    data = config.to_dict()
    return {k: sorted(v) if isinstance(v, set) else getattr(v, "value", v) for k, v in data.items()}


def wrap_student(model: nn.Module, config: PeftConfig | dict | str | os.PathLike | None) -> nn.Module:
    """`model` with peft adapters from `config` (`peft.get_peft_model`): only the adapters (and the config's
    modules_to_save, e.g. the classifier head with ``task_type="SEQ_CLS"``) train. A `PeftModel` is returned as is."""
    if is_peft_model(model) or config is None:
        return model
    from peft import get_peft_model

    config = load_peft_config(config)
    if config.inference_mode:
        raise ValueError("peft_config has inference_mode=True, so no adapter weight would train: set "
                         "inference_mode=False")
    try:
        peft_model = get_peft_model(model, config)
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(f"peft_config does not fit the student {type(model).__name__}: {err}") from err
    if not any(p.requires_grad for p in peft_model.parameters()):
        raise ValueError("peft_config leaves no trainable parameter in the student: check target_modules / "
                         "target_parameters")
    return peft_model


def warn_if_baseless(model: nn.Module, merge_adapters: bool) -> None:
    """Warn when an adapter will be saved alone for a base model that is no saved checkpoint (built in memory)."""
    if merge_adapters or not is_peft_model(model) or model.peft_config[model.active_adapter].base_model_name_or_path:
        return
    warnings.warn("The peft student's base model was not loaded from a checkpoint (built from a config or from other "
                  "models' layers), so a saved adapter names no base model and can only be applied to this same "
                  "in-memory base. Set merge_adapters=True (--merge_adapters true) to save a stock checkpoint.",
                  stacklevel=3)


def merge_peft(model: nn.Module, copy_model: bool = True) -> nn.Module:
    """The base model with the adapters merged into its weights (`merge_and_unload`); other models as they are.

    With `copy_model` (default) the merge runs on a deep copy, so `model` keeps its adapters and can go on training.
    """
    if not is_peft_model(model):
        return model
    if not hasattr(model, "merge_and_unload"):
        raise ValueError(f"{type(model.base_model).__name__} adapters cannot be merged into the weights (e.g. prompt "
                         "tuning): save the adapter instead")
    merged = (copy.deepcopy(model) if copy_model else model).merge_and_unload()
    merged.requires_grad_(True)
    return merged


def load_adapter(path: str | os.PathLike, allow_pickle: bool = False) -> PeftModel:
    """A saved adapter folder on its base model (`base_model_name_or_path` in adapter_config.json)."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoConfig

    from ..utils.outputs import refuse_pickle

    config = PeftConfig.from_pretrained(str(path))
    base = config.base_model_name_or_path
    if not base:
        raise ValueError(f"{path}/{ADAPTER_CONFIG} does not name its base model (base_model_name_or_path): load the "
                         "base model, apply PeftModel.from_pretrained(base, folder) and pass that model instead")
    if not allow_pickle:
        refuse_pickle(base, "allow_pickle=True")
        if not (Path(path) / "adapter_model.safetensors").is_file():
            raise ValueError(f"{path} has no adapter_model.safetensors (pickle adapters are loaded only with "
                             "allow_pickle=True, for files you trust)")
    arch = (AutoConfig.from_pretrained(base).architectures or [""])[0]
    model = _model_class(arch).from_pretrained(base, use_safetensors=None if allow_pickle else True)
    return PeftModel.from_pretrained(model, str(path))


def _model_class(arch: str) -> type:
    """The transformers class named `arch`, else the Auto class for its head (hf_moekd's own models register there)."""
    import transformers

    return (getattr(transformers, arch, None) if arch else None) or auto_class_like(arch)


def remove_stale_files(folder: str | os.PathLike, model: nn.Module, merged: bool) -> None:
    """Before saving `model`'s adapter (or, `merged`, a whole model) into `folder`, delete what the other kind of save
    left there: transformers would load an old adapter on top of new weights, or a new adapter on old weights.

    The base model's own folder keeps its weights (there the adapter loads on them, as it should)."""
    folder = Path(folder)
    if merged:
        for name in ADAPTER_FILES:
            (folder / name).unlink(missing_ok=True)
        return
    base = model.peft_config[model.active_adapter].base_model_name_or_path
    if not folder.is_dir() or (base and Path(base).expanduser().resolve() == folder.resolve()):
        return
    stale = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    for path in [*(folder / name for name in stale), *folder.glob("model-*-of-*.safetensors")]:
        path.unlink(missing_ok=True)


def describe_adapter(model: nn.Module, merged: bool) -> str | None:
    """One line for the model card: the adapter method, its size and targets; None for a model without adapters."""
    if not is_peft_model(model):
        return None
    config = model.peft_config[model.active_adapter]
    parts = [str(getattr(config.peft_type, "value", config.peft_type))]
    if getattr(config, "r", None):
        parts.append(f"r={config.r}" + (f", alpha={config.lora_alpha}" if hasattr(config, "lora_alpha") else ""))
    targets = []
    for value in (getattr(config, "target_modules", None), getattr(config, "target_parameters", None)):
        targets += [value] if isinstance(value, str) else sorted(value or [])
    if targets:
        parts.append("on " + ", ".join(map(str, targets)))
    trainable, total = model.get_nb_trainable_parameters()
    parts.append(f"{trainable:,} of {total:,} parameters trained")
    parts.append("merged into the weights" if merged else "saved as an adapter (load with PeftModel.from_pretrained)")
    return "; ".join(parts)
