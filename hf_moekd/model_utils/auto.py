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
    "ForConditionalGeneration": "AutoModelForSeq2SeqLM",
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


def label_alignment(model: nn.Module) -> str:
    """How a model's labels line up with its logits: "shift" for causal LMs (logits at t predict the label at
    t + 1, as transformers' `ForCausalLMLoss`), "decoder" for encoder-decoders (logits and labels on the decoder
    positions), "aligned" for everything else (classification, token classification, masked LM, regression)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return "decoder"
    name = type(base).__name__
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = {n for names in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for n in ((names,) if isinstance(names, str) else names)}
    return "shift" if name in causal or name.endswith(("ForCausalLM", "LMHeadModel")) else "aligned"


def shift_labels(labels):
    """Labels of a causal LM moved one position left, -100 at the end (transformers' `ForCausalLMLoss`)."""
    import torch.nn.functional as F

    return F.pad(labels, (0, 1), value=-100)[..., 1:]
