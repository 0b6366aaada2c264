"""Expected noise is silenced, actionable messages stay (issue 31.8)."""
from __future__ import annotations

import logging
import warnings

import torch
import transformers as tf
from safetensors.torch import load_file, save_file

from hf_moekd.model_utils.auto import from_pretrained_with_new_head
from hf_moekd.utils.quiet import silence_expected_noise

TINY = dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)


def test_expected_deepspeed_and_pin_memory_messages_are_dropped(caplog):
    silence_expected_noise()
    silence_expected_noise()  # idempotent: one filter
    deepspeed = logging.getLogger("DeepSpeed")
    assert len(deepspeed.filters) == 1
    with caplog.at_level(logging.WARNING, logger="DeepSpeed"):
        deepspeed.warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.")
        deepspeed.warning("ZeRO stage 3 needs more memory")  # actionable: kept
    assert [r.getMessage() for r in caplog.records] == ["ZeRO stage 3 needs more memory"]
    with warnings.catch_warnings(record=True) as caught:
        silence_expected_noise()
        warnings.warn("'pin_memory' argument is set as true but no accelerator is found, then device pinned memory "
                      "won't be used.", UserWarning)
        warnings.warn("something else", UserWarning)
    assert [str(w.message) for w in caught] == ["something else"]


def test_a_new_task_head_is_one_line_and_missing_body_weights_are_named(tmp_path, caplog, capfd):
    torch.manual_seed(0)
    tf.BertModel(tf.BertConfig(**TINY)).save_pretrained(tmp_path / "base")
    with caplog.at_level(logging.WARNING, logger="hf_moekd"):
        model = from_pretrained_with_new_head(tf.AutoModelForSequenceClassification, str(tmp_path / "base"), num_labels=3)
    assert model.config.num_labels == 3
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("hf_moekd")]
    assert len(lines) == 1 and "new task head classifier.bias, classifier.weight" in lines[0]
    assert "LOAD REPORT" not in capfd.readouterr().err

    state = load_file(tmp_path / "base" / "model.safetensors")
    del state["encoder.layer.0.output.dense.weight"]
    save_file(state, str(tmp_path / "base" / "model.safetensors"), metadata={"format": "pt"})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_moekd"):
        from_pretrained_with_new_head(tf.AutoModelForSequenceClassification, str(tmp_path / "base"), num_labels=3)
    body = [r.getMessage() for r in caplog.records if "model body" in r.getMessage()]
    assert len(body) == 1 and "bert.encoder.layer.0.output.dense.weight" in body[0]
