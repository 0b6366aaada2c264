"""Expert probing (the analysis of MoDE, arXiv 2402.00893): each expert's accuracy on the samples the router
allocates to it, when that expert alone serves them.

* Allocation: in MoE layer l, a sample goes to the expert that is the top-1 router choice of most of its real tokens
  (attention_mask = 1; ties go to the lower index), or, with ``allocate_by=p``, of its token at position p (e.g. 0:
  a ViT's CLS token; -1: the last real token of right-padded text, which decoder classifiers pool). A one-token sample simply goes to its
  top-1 expert.
* Serving alone: the allocated samples run again with every token of layer l sent to that expert only, with weight 1
  (top-1 routing with renormalised weights, as Mixtral / V-MoE compute for k = 1); the other layers route as usual.
  Scaling that a model applies outside its experts module is kept (MiniMoE's ``scale_expert_output_by_gate``: as
  MiniMoE is top-1, its probe differs from the model only on the tokens that chose another expert).
* Accuracy: argmax of the logits equals the label (sequence / image classifiers: labels ``[B]``).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..model_utils.experts import find_experts, only_expert, patch_experts
from ..mode.losses import real_tokens
from .batches import iterate_batches, select_examples, to_device


@dataclass
class ProbeRow:
    """One expert of one MoE layer."""

    layer: str
    expert: int
    samples: int
    """Samples allocated to this expert."""
    token_share: float | None
    """Mean fraction of those samples' real tokens whose top-1 expert is this one (None without samples)."""
    model_accuracy: float | None
    """Accuracy of the unchanged MoE on those samples."""
    probe_accuracy: float | None
    """Accuracy on those samples when this expert alone serves them in this layer."""


@dataclass
class ProbeResult:
    """Per-(layer, expert) probing rows, plus totals."""

    rows: list[ProbeRow] = field(default_factory=list)
    samples: int = 0
    model_accuracy: float = 0.0

    def layers(self) -> list[str]:
        return list(dict.fromkeys(row.layer for row in self.rows))

    def mean_probe_accuracy(self, layer: str | None = None) -> float | None:
        """Unweighted mean over experts with samples (of `layer`, or of every layer)."""
        values = [r.probe_accuracy for r in self.rows if r.samples and (layer is None or r.layer == layer)]
        return sum(values) / len(values) if values else None

    def weighted_probe_accuracy(self, layer: str | None = None) -> float | None:
        """Sample-weighted mean (the accuracy if every sample were served by its allocated expert alone)."""
        rows = [r for r in self.rows if r.samples and (layer is None or r.layer == layer)]
        total = sum(r.samples for r in rows)
        return sum(r.probe_accuracy * r.samples for r in rows) / total if total else None

    def to_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "model_accuracy": self.model_accuracy,
                "mean_probe_accuracy": self.mean_probe_accuracy(),
                "weighted_probe_accuracy": self.weighted_probe_accuracy(),
                "per_layer_mean_probe_accuracy": {layer: self.mean_probe_accuracy(layer) for layer in self.layers()},
                "rows": [asdict(row) for row in self.rows]}

    def to_markdown(self) -> str:
        def pct(value: float | None) -> str:
            return "-" if value is None else f"{100 * value:.1f}"

        lines = ["| layer | expert | samples | top-1 token share % | MoE acc % | expert-alone acc % |",
                 "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {r.layer} | {r.expert} | {r.samples} | {pct(r.token_share)} | {pct(r.model_accuracy)} | "
                  f"{pct(r.probe_accuracy)} |" for r in self.rows]
        lines.append(f"\n{self.samples} samples, MoE accuracy {pct(self.model_accuracy)} %, mean per-expert probing "
                     f"accuracy {pct(self.mean_probe_accuracy())} % (sample-weighted {pct(self.weighted_probe_accuracy())} %)")
        return "\n".join(lines)


def _logits(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    logits = model(**inputs).logits
    if logits.dim() != 2:
        raise ValueError(f"Expert probing needs one prediction per sample (logits [batch, classes]), got logits of shape "
                         f"{tuple(logits.shape)}; token-level heads are not supported.")
    return logits


def _at_position(top1: torch.Tensor, mask: torch.Tensor, position: int) -> torch.Tensor:
    """`[B]`: the top-1 expert of each sample's token `position` (negative: from its last real token)."""
    lengths = mask.sum(1)
    index = lengths + position if position < 0 else torch.full_like(lengths, position)
    if bool(((index < 0) | (index >= lengths)).any()):
        raise ValueError(f"allocate_by={position} lies outside some samples' real tokens (lengths {lengths.tolist()}).")
    return top1.gather(1, index[:, None])[:, 0]


@torch.no_grad()
def probe_experts(model: nn.Module, data: Any, batch_size: int = 64, collate_fn: Callable | None = None,
                  label_key: str = "labels", max_batches: int | None = None,
                  allocate_by: str | int = "majority") -> ProbeResult:
    """Probe every expert of every MoE layer of a classifier `model` on `data` (a DataLoader / iterator of dict
    batches, or a dataset batched with `collate_fn`). `allocate_by`: 'majority' (top-1 choice of most real tokens)
    or a token position. See the module docstring for the definitions."""
    if allocate_by != "majority" and not isinstance(allocate_by, int):
        raise ValueError(f"allocate_by must be 'majority' or a token position (int), got {allocate_by!r}.")
    num_experts = {name: adapter.num_experts for name, adapter in find_experts(model).items()}
    # per (layer, expert): samples, token-share sum, model correct, probe correct
    stats: dict[tuple[str, int], list[float]] = defaultdict(lambda: [0, 0.0, 0, 0])
    n_samples = n_correct = 0
    was_training = model.training
    model.eval()
    try:
        for batch in iterate_batches(data, batch_size, collate_fn, max_batches):
            inputs = to_device(batch, model)
            labels = inputs.pop(label_key, None)
            if labels is None or labels.dim() != 1:
                raise ValueError(f"Expert probing needs one label per sample under {label_key!r} (shape [batch]).")
            with patch_experts(model) as calls:
                correct = _logits(model, inputs).argmax(-1) == labels
            if len({c.layer for c in calls}) != len(calls):
                raise ValueError("An experts module ran more than once in one forward pass; probing needs one call per layer.")
            n, n_samples, n_correct = len(labels), n_samples + len(labels), n_correct + int(correct.sum())
            for call in calls:
                mask = real_tokens(call.index.shape[0], n, inputs.get("attention_mask")).to(labels.device)
                top1 = call.index[:, 0].view(mask.shape)
                votes = (F.one_hot(top1, num_experts[call.layer]) * mask.unsqueeze(-1)).sum(1)  # [B, E] real tokens
                allocated = votes.argmax(-1) if allocate_by == "majority" else _at_position(top1, mask, allocate_by)
                share = votes.gather(1, allocated[:, None])[:, 0] / mask.sum(1).clamp_min(1)
                for e in allocated.unique().tolist():
                    keep = allocated == e
                    with patch_experts(model, route={call.layer: only_expert(e)}):
                        probe = _logits(model, select_examples(inputs, keep)).argmax(-1) == labels[keep]
                    row = stats[call.layer, e]
                    row[0] += int(keep.sum())
                    row[1] += float(share[keep].sum())
                    row[2] += int(correct[keep].sum())
                    row[3] += int(probe.sum())
    finally:
        model.train(was_training)
    if not n_samples:
        raise ValueError("probe_experts got no batches.")
    result = ProbeResult(samples=n_samples, model_accuracy=n_correct / n_samples)
    for layer, experts in num_experts.items():
        for e in range(experts):
            count, share, model_ok, probe_ok = stats.get((layer, e), (0, 0.0, 0, 0))
            ratio = (lambda x: x / count) if count else (lambda x: None)
            result.rows.append(ProbeRow(layer, e, count, ratio(share), ratio(model_ok), ratio(probe_ok)))
    return result


__all__ = ["ProbeResult", "ProbeRow", "probe_experts"]
