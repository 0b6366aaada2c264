"""Per-expert outputs of MoE layers, captured without editing model code.

Supported experts modules (found by `find_experts`):

* hf_moekd's MiniMoE (`MiniMoEExperts`, top-1, `forward(hidden [N, H], expert_index [N])`, unweighted output; the
  gate scaling happens outside, in `MiniMoESparseFFN`) and V-MoE (`VMoEExperts`, top-k,
  `forward(hidden, experts [N, k], weights [N, k])`, weighted sum);
* transformers' fused experts (Mixtral, Qwen2-MoE, OLMoE, ...: `gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`,
  `forward(hidden [N, H], top_k_index [N, k], top_k_weights [N, k])`, weighted sum). The flags set by
  transformers' `@use_experts_implementation` (`has_gate`, `has_bias`, `is_transposed`, `_apply_gate`) are honoured.

`patch_experts` swaps each experts module's `forward` (an instance attribute, removed on exit) for an equivalent
one that runs every expert FFN once per group of tokens and also records, per call, the routing and the per-expert
outputs *before* gate weighting. A forward hook could only recompute those outputs next to the module's own
forward (k more FFNs per token); the swap costs nothing extra in `routed` mode. The swapped forward returns what the
original returns (tested against it for every family); for transformers models it stands in for whichever experts
implementation the config selected (`eager`, `grouped_mm`, ...) with one dense FFN call per expert. Refused: expert-
parallel experts, and modules whose `forward` is already replaced on the instance (e.g. accelerate offloading hooks).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .capture import unwrap
from .moe_layout import fused_experts_layout
from ..models.minimoe.modeling_minimoe import MiniMoEExperts
from ..models.vmoe.modeling_vmoe import VMoEExperts

Record = Literal["routed", "all"]
Route = Callable[[torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor | None]]


@dataclass
class ExpertCall:
    """What one call of an experts module saw (tokens are the flattened `[batch * seq]` rows)."""

    layer: str
    """Name of the experts module in the model."""
    index: torch.Tensor
    """`[N, k]` experts each token was routed to, in router order (column 0 = top-1)."""
    outputs: torch.Tensor | None = None
    """`[N, k, H]` (record='routed': the k routed experts) or `[N, E, H]` (record='all': every expert) FFN outputs
    before gate weighting; None when nothing was recorded."""


class ExpertsAdapter:
    """How to read the routing of, and run one expert of, one experts module."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.num_experts = int(module.num_experts)

    arg_names: tuple[str, str, str] = ("hidden_states", "top_k_index", "top_k_weights")

    def parse(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """`(hidden [N, H], index [N, k], weights [N, k] or None)` from the forward's arguments."""
        values = [*args, *(kwargs[n] for n in self.arg_names[len(args):] if n in kwargs)]
        return values[0], values[1], values[2]

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def combine(self, outputs: torch.Tensor, weights: torch.Tensor | None, hidden: torch.Tensor) -> torch.Tensor:
        """The original forward's result from `[N, k, H]` per-expert outputs: `sum_j weights[:, j] * outputs[:, j]`."""
        return (outputs * weights.unsqueeze(-1).to(outputs.dtype)).sum(1).to(hidden.dtype)


class MiniMoEAdapter(ExpertsAdapter):
    """MiniMoE: top-1, `forward(hidden, expert_index [N])`, unweighted output (gate scaling is outside)."""

    def parse(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        hidden = args[0] if args else kwargs["hidden_states"]
        index = args[1] if len(args) > 1 else kwargs["expert_index"]
        return hidden, index.unsqueeze(-1), None

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return self.module.expert_forward(e, x)

    def combine(self, outputs: torch.Tensor, weights: torch.Tensor | None, hidden: torch.Tensor) -> torch.Tensor:
        if outputs.shape[1] != 1:
            raise ValueError("MiniMoE experts serve each token with exactly one expert.")
        return outputs[:, 0]


class VMoEAdapter(ExpertsAdapter):
    """V-MoE: top-k, `forward(hidden, experts [N, k], weights [N, k])`, weighted sum."""

    arg_names = ("hidden_states", "experts", "weights")

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return self.module.expert_forward(e, x)


class FusedExpertsAdapter(ExpertsAdapter):
    """transformers' fused experts: `gate_up_proj [E, 2I, H]` (or `up_proj`), `down_proj [E, H, I]`."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        if getattr(module, "_is_expert_parallel", False):
            raise ValueError(f"{type(module).__name__} is expert-parallel (experts sharded over processes); MoDE and "
                             "expert probing need every expert on this process.")
        if getattr(module, "has_post_expert_norm", False):
            raise ValueError(f"{type(module).__name__} normalises each expert's output (post_expert_norm), which "
                             "MoDE does not reproduce; use an MoE without it.")

    def _linear(self, x: torch.Tensor, name: str, e: int) -> torch.Tensor:
        weight = getattr(self.module, name)[e]
        if getattr(self.module, "is_transposed", False):
            weight = weight.transpose(0, 1)
        bias = getattr(self.module, f"{name}_bias")[e] if getattr(self.module, "has_bias", False) else None
        return F.linear(x, weight, bias)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        module = self.module
        if getattr(module, "has_gate", True):
            projected = self._linear(x, "gate_up_proj", e)
            if hasattr(module, "_apply_gate"):
                inner = module._apply_gate(projected)
            else:
                gate, up = projected.chunk(2, dim=-1)
                inner = module.act_fn(gate) * up
        else:
            inner = module.act_fn(self._linear(x, "up_proj", e))
        return self._linear(inner, "down_proj", e)


def adapter_for(module: nn.Module) -> ExpertsAdapter | None:
    """The adapter of an experts module with more than one expert, None for any other module."""
    if isinstance(module, VMoEExperts):
        return VMoEAdapter(module)
    if isinstance(module, MiniMoEExperts):
        return MiniMoEAdapter(module) if module.num_experts > 1 else None
    layout = fused_experts_layout(module)  # the same test gathering uses (moe_layout.moe_blocks)
    return FusedExpertsAdapter(module) if layout is not None and layout.num_experts > 1 else None


def find_experts(model: nn.Module) -> dict[str, ExpertsAdapter]:
    """Name -> adapter of every MoE experts module of `model`, in forward order; a clear error when there is none."""
    found = {}
    for name, module in unwrap(model).named_modules():
        adapter = adapter_for(module)
        if adapter is not None:
            found[name] = adapter
    if not found:
        raise ValueError(
            f"{type(unwrap(model)).__name__} has no supported MoE experts module (hf_moekd MiniMoE / V-MoE experts, or "
            "transformers' fused experts with gate_up_proj [E, 2I, H] and down_proj [E, H, I] as in Mixtral, "
            "Qwen2-MoE, OLMoE)."
        )
    return found


def model_top_k(model: nn.Module) -> int | None:
    """Experts per token from the model's config (1 for MiniMoE), None when the config does not say."""
    config = getattr(unwrap(model), "config", None)
    if getattr(config, "model_type", None) == "minimoe":
        return 1
    return getattr(config, "num_experts_per_tok", None)


def run_routed(adapter: ExpertsAdapter, hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`[N, k, H]`: each token through each of its k experts, one FFN call per expert on its token group."""
    tokens, top_k = index.shape
    flat = index.reshape(-1)
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=adapter.num_experts).tolist()
    groups = hidden.index_select(0, order // top_k).split(counts)
    # Empty groups still run (on 0 rows), as in the models, so every expert stays in the graph.
    sorted_out = torch.cat([adapter.expert(e, group) for e, group in enumerate(groups)])
    return sorted_out.index_select(0, order.argsort()).view(tokens, top_k, -1)


def run_all(adapter: ExpertsAdapter, hidden: torch.Tensor) -> torch.Tensor:
    """`[N, E, H]`: every expert on every token (E FFN calls per token)."""
    return torch.stack([adapter.expert(e, hidden) for e in range(adapter.num_experts)], dim=1)


def _patched_forward(name: str, adapter: ExpertsAdapter, record: Record | None, route: Route | None,
                     calls: list[ExpertCall]) -> Callable[..., torch.Tensor]:
    def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
        hidden, index, weights = adapter.parse(args, kwargs)
        if index.dim() != 2 or (weights is not None and weights.shape != index.shape):
            raise ValueError(f"{name}: expected routing as expert indices [tokens, k] with matching weights, got "
                             f"{tuple(index.shape)} and {None if weights is None else tuple(weights.shape)}; this "
                             f"experts module ({type(adapter.module).__name__}) is not supported.")
        if route is not None:
            index, weights = route(index, weights)
        if record == "all":
            everything = run_all(adapter, hidden)
            routed = everything.gather(1, index.unsqueeze(-1).expand(-1, -1, everything.shape[-1]))
            calls.append(ExpertCall(name, index, everything))
        else:
            routed = run_routed(adapter, hidden, index)
            calls.append(ExpertCall(name, index, routed if record == "routed" else None))
        return adapter.combine(routed, weights, hidden)
    return forward


@contextmanager
def patch_experts(model: nn.Module, record: Record | None = None, route: dict[str, Route] | None = None
                  ) -> Iterator[list[ExpertCall]]:
    """Within the context, every forward of an MoE experts module of `model` appends an `ExpertCall` to the yielded
    (new) list, with per-expert outputs when `record` is 'routed' or 'all'.

    `route` maps experts-module names to functions `(index [N, k], weights [N, k] or None) -> (index, weights)` that
    replace the router's choice (used by expert probing).
    """
    adapters = find_experts(model)
    unknown = set(route or {}) - set(adapters)
    if unknown:
        raise ValueError(f"route names unknown experts modules {sorted(unknown)}; the model has {list(adapters)}.")
    for name, adapter in adapters.items():
        if "forward" in vars(adapter.module):
            raise ValueError(f"{name}.forward is already replaced on the instance (accelerate offloading hooks or "
                             "another patch); MoDE and expert probing need the module's own forward.")
    calls: list[ExpertCall] = []
    try:
        for name, adapter in adapters.items():
            adapter.module.forward = _patched_forward(name, adapter, record, (route or {}).get(name), calls)
        yield calls
    finally:
        for adapter in adapters.values():
            vars(adapter.module).pop("forward", None)


def only_expert(expert: int) -> Route:
    """A `route` function sending every token to `expert` alone, with weight 1."""
    def route(index: torch.Tensor, weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        forced = torch.full_like(index[:, :1], expert)
        return forced, None if weights is None else torch.ones_like(weights[:, :1])
    return route


__all__ = ["ExpertCall", "ExpertsAdapter", "find_experts", "model_top_k", "only_expert", "patch_experts",
           "run_all", "run_routed"]
