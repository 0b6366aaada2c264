"""Tiny models and datasets for fast tests."""
from __future__ import annotations

import datasets
import torch
from transformers import BertConfig, BertForSequenceClassification, BertForTokenClassification

VOCAB = 64


def bert_config(hidden: int = 32, layers: int = 2, heads: int = 4, num_labels: int = 3, **kw) -> BertConfig:
    return BertConfig(
        vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=2 * hidden, max_position_embeddings=64, num_labels=num_labels,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kw,
    )


def tiny_bert(seed: int = 0, token: bool = False, **kw):
    torch.manual_seed(seed)
    cls = BertForTokenClassification if token else BertForSequenceClassification
    return cls(bert_config(**kw))


def tiny_dataset(n: int = 32, seq: int = 12, num_labels: int = 3, token: bool = False, seed: int = 0, ragged: bool = False):
    """Random token ids; with `ragged`, lengths vary and short rows are padded (attention_mask 0)."""
    g = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    for _ in range(n):
        length = int(torch.randint(seq // 2, seq + 1, (1,), generator=g)) if ragged else seq
        ids = torch.randint(1, VOCAB, (length,), generator=g).tolist()
        pad = seq - length
        rows["input_ids"].append(ids + [0] * pad)
        rows["attention_mask"].append([1] * length + [0] * pad)
        if token:
            labels = torch.randint(0, num_labels, (length,), generator=g).tolist()
            rows["labels"].append(labels + [-100] * pad)
        else:
            rows["labels"].append(int(torch.randint(0, num_labels, (1,), generator=g)))
    return datasets.Dataset.from_dict(rows)
