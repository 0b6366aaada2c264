"""MiniMoE ("Lifting the Curse of Capacity Gap in Distilling Language Models", ACL 2023): a student with a mixture of
minimal experts, distilled in two stages (task-agnostic MiniLMv2 relations, then task KD).

The model is `hf_moekd.models.minimoe` (transformers-style, Auto-registered); `minimoe_from_dense` builds one from a
dense BERT-like student. This package registers the method's card section; the two stages run with
`DistillationTrainer` (examples/run_task_agnostic.py, then `hf-moekd distill --moe_experts`).
"""
from . import card as _card  # noqa: F401  (registers the card section)
from ..models.minimoe import minimoe_from_dense


__all__ = ["minimoe_from_dense"]
