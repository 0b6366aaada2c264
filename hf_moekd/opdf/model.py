"""Over-parameterise a model's linears as MPOs for training (`overparameterize`) and fold them back into plain linears
(`contract_overparameterized`)."""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from .config import DEFAULT_TARGET_MODULES, MPOConfig
from .decomposition import check_gauge
from .layers import MPOLinear

__all__ = ["DEFAULT_TARGET_MODULES", "MPOConfig", "OverparameterizedReport", "contract_overparameterized", "mpo_modules",
           "overparameterize"]

@dataclass
class OverparameterizedReport:
    """What `overparameterize` did."""

    replaced: list[str]
    params_before: int
    params_after: int
    max_truncation_error: float = 0.0

    @property
    def num_replaced(self) -> int:
        return len(self.replaced)

    @property
    def ratio(self) -> float:
        """Model parameters after / before."""
        return self.params_after / self.params_before

    def __str__(self) -> str:
        return (f"MPO: replaced {self.num_replaced} linears; parameters {self.params_before:,} -> {self.params_after:,} "
                f"(x{self.ratio:.2f}), max truncation error {self.max_truncation_error:.2e}")


def _matches(name: str, target_modules: list[str] | str) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return name in target_modules or any(name.endswith(f".{t}") for t in target_modules)


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def mpo_modules(model: nn.Module) -> dict[str, MPOLinear]:
    """Name -> `MPOLinear` of every over-parameterised layer of `model`."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MPOLinear)}


def overparameterize(
    model: nn.Module,
    target_modules: list[str] | str | None = None,
    factors: dict[int, list[int]] | None = None,
    max_bond: int | None = None,
    *,
    num_cores: int = 5,
    gauge: str | None = None,
    config: MPOConfig | None = None,
) -> OverparameterizedReport:
    """Replace, in place, the `nn.Linear` modules matching `target_modules` by `MPOLinear` (see `MPOConfig`).

    Without truncation the model computes the same function (up to float rounding) with ~3x more trainable
    parameters in the replaced layers. Call `contract_overparameterized` before `save_pretrained` to get a stock
    checkpoint. `gauge`: ``"official"`` (default: OPDF's symmetric square-root gauge) or ``"center"`` (all scale in
    the central tensor), see `mpo_decompose`.
    """
    if config is not None:
        if target_modules is not None or factors is not None or max_bond is not None or gauge is not None:
            raise ValueError("Pass either config=MPOConfig(...) or target_modules/factors/max_bond/gauge, not both.")
        target_modules, factors, max_bond, num_cores = config.target_modules, config.factors, config.max_bond, config.num_cores
        gauge = config.gauge
    gauge = check_gauge("official" if gauge is None else gauge)
    targets = DEFAULT_TARGET_MODULES if target_modules is None else target_modules
    factors = factors or {}
    linears = {name: m for name, m in model.named_modules() if type(m) is nn.Linear}
    chosen = [name for name in linears if _matches(name, targets)]
    if not chosen:
        sample = list(linears)[:8]
        raise ValueError(
            f"No nn.Linear of {type(model).__name__} matches target_modules={targets!r}. "
            f"Some of its linear modules: {sample}{' ...' if len(linears) > len(sample) else ''}."
        )
    tied = _tied_weights(model)
    before, worst = _num_params(model), 0.0
    for name in chosen:
        linear = linears[name]
        if id(linear.weight) in tied:
            raise ValueError(f"{name}.weight is tied to another parameter; an MPO layer would untie it. Exclude {name!r}.")
        layer = MPOLinear.from_linear(linear, factors.get(linear.out_features), factors.get(linear.in_features),
                                      max_bond=max_bond, num_cores=num_cores, gauge=gauge)
        worst = max(worst, layer.truncation_error)
        _set_module(model, name, layer)
    return OverparameterizedReport(chosen, before, _num_params(model), worst)


def _tied_weights(model: nn.Module) -> set[int]:
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {k for k, count in seen.items() if count > 1}


def contract_overparameterized(model: nn.Module) -> nn.Module:
    """Replace, in place, every `MPOLinear` by the equivalent `nn.Linear`; returns `model`.

    The result has the original modules, parameter names and count, so `save_pretrained` writes a stock checkpoint.
    """
    for name, layer in list(mpo_modules(model).items()):
        _set_module(model, name, layer.to_linear())
    return model
