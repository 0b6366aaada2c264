"""Which Auto class loads a model with the same kind of head as another, and loading a checkpoint under a new head."""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Iterator

import transformers
from torch import nn

logger = logging.getLogger(__name__)

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


def _not_a_load_report(record: logging.LogRecord) -> bool:
    return "LOAD REPORT" not in str(record.msg)


@contextmanager
def _quiet_load_report() -> Iterator[None]:
    """transformers' LOAD REPORT (a warning of `transformers.modeling_utils`) held back while loading; a filter, not a
    level (that logger's level switches other checks on)."""
    report = transformers.utils.logging.get_logger("transformers.modeling_utils")
    report.addFilter(_not_a_load_report)
    try:
        yield
    finally:
        report.removeFilter(_not_a_load_report)


def from_pretrained_with_new_head(auto_class: type, path: str, **kwargs: Any) -> nn.Module:
    """`auto_class.from_pretrained(path, **kwargs)` for a student that may start from a base checkpoint: a task head
    missing from the checkpoint is expected and said in one line, instead of transformers' table of MISSING keys;
    missing weights in the model's body (a real problem) are still reported, by name."""
    with _quiet_load_report():
        model, info = auto_class.from_pretrained(path, output_loading_info=True, **kwargs)
    prefix = f"{model.base_model_prefix}."
    missing = sorted(info.get("missing_keys", []))
    head = [k for k in missing if not k.startswith(prefix)]
    body = [k for k in missing if k.startswith(prefix)]
    if head:
        logger.warning("%s: new task head %s initialised (not in %s; expected when starting from a base checkpoint)",
                       type(model).__name__, ", ".join(head), path)
    if body:
        logger.warning("%s: %d weights of the model body are not in %s and were initialised at random: %s%s",
                       type(model).__name__, len(body), path, ", ".join(body[:6]), " ..." if len(body) > 6 else "")
    return model
