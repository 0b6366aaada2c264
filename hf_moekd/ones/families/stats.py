"""Calibration statistics of a sparse block: expert usage, routed probability mass, a shared-expert gate's mean.

Every fused experts module of transformers is called as ``experts(hidden [T, H], top_k_index [T, k],
top_k_weights [T, k])`` (V-MoE's experts too), whichever router produced the routing: a forward pre-hook on the
experts module reads each family's own routing from there (:func:`experts_call_stats`). Switch Transformers' experts
are a plain ``ModuleDict`` and Llama-4's experts receive inputs already scaled: their router output is read instead
(:func:`switch_router_stats`, :func:`sigmoid_router_stats`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

__all__ = ["RoutingStats", "StatFn", "experts_call_stats", "switch_router_stats", "sigmoid_router_stats",
           "shared_gate_stats"]


@dataclass
class RoutingStats:
    """Calibration statistics of one sparse block."""

    num_experts: int
    counts: Tensor | None = None  # token->expert assignments per expert
    tokens: int = 0
    routed_mass: float = 0.0  # sum over tokens of the routing weights that scale the experts' outputs
    extras: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.counts is None:
            self.counts = torch.zeros(self.num_experts, dtype=torch.float64)

    @property
    def usage(self) -> Tensor | None:
        """Each expert's share of routed tokens, or None before any token was seen."""
        total = self.counts.sum()
        return None if total <= 0 else (self.counts / total).float()

    def mean(self, name: str) -> float | None:
        return None if not self.tokens or name not in self.extras else self.extras[name] / self.tokens

    def add(self, index: Tensor, weights: Tensor) -> None:
        """One call's routing: ``index [T, k]`` experts and ``weights [T, k]`` scaling their outputs."""
        valid = index < self.num_experts  # some routers mark dropped / zero-computation slots with index >= E
        self.counts += torch.bincount(index[valid].flatten(), minlength=self.num_experts)[: self.num_experts].double()
        self.tokens += index.shape[0]
        self.routed_mass += float((weights.float() * valid).sum())


StatFn = Callable[[tuple, dict, Any, "Tensor | None", RoutingStats], None]
"""``(args, kwargs, output, token mask, stats)``: a hook's view of one call (pre-hooks get ``output=None``)."""


def _masked(t: Tensor, mask: Tensor | None) -> Tensor:
    """Flatten the token axes of ``t`` ([..., D] -> [T, D]) and keep the tokens where ``mask`` is set."""
    t = t.reshape(-1, t.shape[-1])
    return t if mask is None or mask.numel() != t.shape[0] else t[mask]


def experts_call_stats(args: tuple, kwargs: dict, out: Any, mask: Tensor | None, st: RoutingStats) -> None:
    """Routing passed to a fused experts module: ``(hidden, top_k_index, top_k_weights)``, by position or name."""
    names = (("top_k_index", "router_indices", "experts"), ("top_k_weights", "routing_weights", "weights"))
    values = [args[i + 1] if len(args) > i + 1 else next((kwargs[n] for n in ns if n in kwargs), None)
              for i, ns in enumerate(names)]
    if any(v is None or v.dim() < 2 for v in values):
        raise ValueError("the experts module was not called with (hidden, top_k_index [T, k], top_k_weights [T, k]); "
                         "this family needs its own router statistics (MoEFamily.router_stats)")
    st.add(_masked(values[0], mask), _masked(values[1], mask))


def switch_router_stats(args: tuple, kwargs: dict, out: Any, mask: Tensor | None, st: RoutingStats) -> None:
    """Switch routers returning ``(capacity-masked one-hot [B,S,E], top-1 prob [B,S,1], logits)``."""
    dispatch, prob = _masked(out[0].float(), mask), _masked(out[1].float(), mask)
    st.counts += dispatch.sum(0).double()
    st.tokens += dispatch.shape[0]
    st.routed_mass += float((prob[:, 0] * dispatch.sum(-1)).sum())  # dropped tokens get no expert output


def sigmoid_router_stats(args: tuple, kwargs: dict, out: Any, mask: Tensor | None, st: RoutingStats) -> None:
    """Llama-4 routers returning ``(scores [T, E], logits)``: the chosen experts' sigmoid scores, 0 elsewhere."""
    scores = _masked(out[0].float(), mask)
    st.counts += (scores > 0).sum(0).double()
    st.tokens += scores.shape[0]
    st.routed_mass += float(scores.sum())


def shared_gate_stats(args: tuple, kwargs: dict, out: Tensor, mask: Tensor | None, st: RoutingStats) -> None:
    """A sigmoid shared-expert gate's output (Qwen2-MoE's ``shared_expert_gate``): accumulate sigmoid(x·g)."""
    st.extras["shared_gate"] = st.extras.get("shared_gate", 0.0) + float(_masked(out.float(), mask).sigmoid().sum())
