"""Offline `evaluate` metrics (GLUE, seqeval) and `compute_metrics` factories for `transformers.Trainer`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import evaluate
import numpy as np

from ..data.text import get_glue_task

if TYPE_CHECKING:
    from transformers import EvalPrediction

METRIC_DIR = Path(__file__).resolve().parent
_MODULES = {"glue": "glue_local", "seqeval": "seqeval_local"}


def load_metric(name: str, config_name: str | None = None) -> evaluate.EvaluationModule:
    """Load a bundled metric ("glue" with a task name as config, or "seqeval") without network access."""
    if name not in _MODULES:
        raise ValueError(f"Unknown metric {name!r}; choose one of: {', '.join(_MODULES)}")
    return evaluate.load(str(METRIC_DIR / _MODULES[name]), config_name)


def glue_compute_metrics(task_name: str) -> Callable[[EvalPrediction], dict[str, float]]:
    """Trainer `compute_metrics` for a GLUE task: argmax of the logits, or the squeezed score for STS-B."""
    task = get_glue_task(task_name)
    metric = load_metric("glue", task.name)

    def compute_metrics(eval_pred: EvalPrediction) -> dict[str, float]:
        logits = _first(eval_pred.predictions)
        predictions = logits.reshape(-1) if task.is_regression else logits.argmax(-1)
        return metric.compute(predictions=predictions, references=eval_pred.label_ids)

    return compute_metrics


def conll_compute_metrics(label_names: Sequence[str]) -> Callable[[EvalPrediction], dict[str, float]]:
    """Trainer `compute_metrics` for token classification: entity-level precision/recall/f1, token accuracy and,
    from logits, `loss`: the cross-entropy averaged over every labelled token of the split. It replaces the
    Trainer's `eval_loss` (a mean of per-batch means, which changes with the batch size), so the same data gives
    the same loss at any batch size.

    Positions labelled -100 (special tokens, non-first sub-words, padding) are ignored; predictions may be
    logits (argmax is taken) or class ids.
    """
    names = list(label_names)
    metric = load_metric("seqeval")

    def compute_metrics(eval_pred: EvalPrediction) -> dict[str, float]:
        labels = np.asarray(eval_pred.label_ids)
        predictions = _first(eval_pred.predictions)
        keep = labels != -100
        token_loss = {}
        if predictions.ndim == labels.ndim + 1:
            token_loss = {"loss": token_cross_entropy(predictions[keep], labels[keep])}
            predictions = predictions.argmax(-1)
        scores = metric.compute(
            predictions=[[names[i] for i in row[mask]] for row, mask in zip(predictions, keep)],
            references=[[names[i] for i in row[mask]] for row, mask in zip(labels, keep)],
            zero_division=0,  # an entity type never predicted scores 0 without a warning at every evaluation
        )
        return {**{key: float(scores[f"overall_{key}"]) for key in ("precision", "recall", "f1", "accuracy")}, **token_loss}

    return compute_metrics


def token_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean cross-entropy of `[N, C]` logits against `[N]` class ids, in float64 (log-sum-exp, stable)."""
    logits = logits.astype(np.float64)
    top = logits.max(-1, keepdims=True)
    log_z = top[:, 0] + np.log(np.exp(logits - top).sum(-1))
    return float((log_z - logits[np.arange(len(labels)), labels]).mean()) if len(labels) else 0.0


def _first(predictions: np.ndarray | tuple) -> np.ndarray:
    """Model outputs may come as a tuple (logits, hidden states, ...): keep the logits."""
    return np.asarray(predictions[0] if isinstance(predictions, tuple) else predictions)
