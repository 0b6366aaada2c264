"""Which Auto class loads a model with the same kind of head as another."""
from __future__ import annotations

import transformers
from torch import nn

# Student class-name suffix -> Auto class used to load a teacher with the same kind of head.
_AUTO_BY_SUFFIX = {
    "ForSequenceClassification": "AutoModelForSequenceClassification",
    "ForTokenClassification": "AutoModelForTokenClassification",
    "ForImageClassification": "AutoModelForImageClassification",
    "ForMaskedLM": "AutoModelForMaskedLM",
    "ForCausalLM": "AutoModelForCausalLM",
}


def auto_class_like(model: nn.Module | type | str | None) -> type:
    """The Auto class that loads a model with the same kind of head as `model` (an instance, a class or a class
    name such as a config's `architectures[0]`)."""
    if model is None or isinstance(model, str):
        name = model or ""
    else:
        name = (model if isinstance(model, type) else type(model)).__name__
    for suffix, auto in _AUTO_BY_SUFFIX.items():
        if name.endswith(suffix):
            return getattr(transformers, auto)
    return transformers.AutoModel
