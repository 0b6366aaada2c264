"""`GatheringConfig`: how a sparse MoE's experts are merged into its dense twin, in one place.

The same dataclass is the keyword arguments of `gather_experts`, the flags of `hf-moekd gather` (parsed by
`transformers.HfArgumentParser`) and, written as :data:`GRAMMAR` (`from_string` / `to_string`, e.g. `svd-r16+align`,
`top_experts-k1`, `top_kg-u4`, `top_kg-f0.25-weight`), the variants a OneS study compares.
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field, fields, replace
from decimal import Decimal

from .strategies import DEFAULT_STRATEGY, GRANULARITIES, MERGE_STRATEGIES, SVD_METHODS, check_top_kg_options

__all__ = ["GatheringConfig", "DEFAULT_STRATEGY", "DEPRECATED_STRATEGIES", "as_gathering_config", "strategy_names"]

DEPRECATED_STRATEGIES = {"topk": "top_experts"}  # old name -> new name; the API still takes them (FutureWarning)

# a GatheringConfig as a string
GRAMMAR = "<strategy>[-r<rank>][-k<top_k>][-u<units>][-f<keep_fraction>][-<svd_method>][-<granularity>][+align]"
# GatheringConfig field -> the strategy function's argument it sets
STRATEGY_ARGUMENTS = {"rank": "rank", "top_k": "k", "svd_method": "method", "granularity": "granularity",
                      "units": "units", "keep_fraction": "keep_fraction"}
_PREFIXES = {"r": "rank", "k": "top_k", "u": "units", "f": "keep_fraction"}  # variant-string part -> field
_WORDS = {**dict.fromkeys(SVD_METHODS, "svd_method"), **dict.fromkeys(GRANULARITIES, "granularity")}
_NUMBERS = {"keep_fraction": (re.compile(r"\d+(\.\d*)?|\.\d+"), float)}  # other number fields: integers
_INTEGER = (re.compile(r"\d+"), int)


def strategy_names() -> list[str]:
    """The registered strategies, deprecated names left out (the command-line choices)."""
    return sorted(set(MERGE_STRATEGIES) - set(DEPRECATED_STRATEGIES))


@dataclass
class GatheringConfig:
    """What `gather_experts` merges and how; validated on creation (one line per bad value)."""

    strategy: str | None = field(
        default=None,
        metadata={"help": f"Merge strategy (default: svd when --rank is given, else {DEFAULT_STRATEGY}, the "
                          "usage-weighted mean of the experts).",
                  "choices": strategy_names()},
    )
    rank: int | None = field(
        default=None,
        metadata={"help": "SVD-KG rank per expert (svd only; default: min(hidden, intermediate) // experts; full rank "
                          "= weighted_average)."},
    )
    top_k: int | None = field(
        default=None, metadata={"help": "Experts kept by top_experts (default: the router's top-k)."},
    )
    svd_method: str | None = field(
        default=None,
        metadata={"help": "SVD-KG merge formula (svd only; default: expert).",
                  "choices": sorted(SVD_METHODS)},
    )
    granularity: str | None = field(
        default=None,
        metadata={"help": "What top_kg (Top-KG, our stated reading) keeps from each expert: unit = its most important "
                          "hidden units, concatenated, out-columns scaled by usage (default); weight = its "
                          "largest-magnitude weights, then the usage-weighted average (top_kg only).",
                  "choices": list(GRANULARITIES)},
    )
    units: int | None = field(
        default=None,
        metadata={"help": "Hidden units kept per expert by top_kg, granularity unit (default: intermediate // "
                          "experts, the remainder to the most used experts)."},
    )
    keep_fraction: float | None = field(
        default=None,
        metadata={"help": "Fraction of each expert matrix's weights kept by top_kg, granularity weight (default: "
                          "1 / experts)."},
    )
    align: bool = field(default=False, metadata={"help": "Align hidden units across experts before merging."})

    def __post_init__(self) -> None:
        if self.strategy is None:
            self.strategy = "svd" if self.rank is not None else DEFAULT_STRATEGY
        if self.strategy not in MERGE_STRATEGIES:
            raise ValueError(f"unknown gathering strategy {self.strategy!r}; choose one of {strategy_names()}")
        for name in ("rank", "top_k", "units"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"gathering {name} must be an integer >= 1, got {value!r}")
        if self.svd_method is not None and self.svd_method not in SVD_METHODS:
            raise ValueError(f"unknown svd_method {self.svd_method!r}; choose one of {sorted(SVD_METHODS)}")
        if self.granularity is not None and self.granularity not in GRANULARITIES:
            raise ValueError(f"unknown granularity {self.granularity!r}; choose one of {list(GRANULARITIES)}")
        value = self.keep_fraction
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1):
            raise ValueError(f"gathering keep_fraction must be a number in (0, 1], got {value!r}")
        takes = set(inspect.signature(MERGE_STRATEGIES[self.strategy]).parameters)
        own = [name for name, argument in STRATEGY_ARGUMENTS.items() if argument in takes]
        if bad := [name for name in STRATEGY_ARGUMENTS if getattr(self, name) is not None and name not in own]:
            raise ValueError(f"strategy {self.strategy!r} does not take option(s) {bad}; it takes {own or 'none'}")
        if "granularity" in own:
            check_top_kg_options(self.granularity or "unit", self.units, self.keep_fraction)

    def strategy_options(self) -> dict[str, int | float | str]:
        """The strategy function's keyword arguments (its own names: ``rank``, ``k``, ``method``, ``granularity``,
        ``units``, ``keep_fraction``), set ones only."""
        return {arg: value for name, arg in STRATEGY_ARGUMENTS.items() if (value := getattr(self, name)) is not None}

    def to_string(self) -> str:
        """The variant string: ``svd-r16+align``, ``top_experts-k1``, ``svd-joint``, ``top_kg-f0.25-weight``."""
        numbers = [(letter, getattr(self, name)) for letter, name in _PREFIXES.items()]
        parts = [self.strategy, *(f"{letter}{_plain(v)}" for letter, v in numbers if v is not None), self.svd_method,
                 self.granularity]
        return "-".join(p for p in parts if p) + ("+align" if self.align else "")

    @classmethod
    def from_string(cls, spec: str) -> GatheringConfig:
        """``svd-r16+align`` -> ``GatheringConfig("svd", rank=16, align=True)``; one error line naming ``spec``."""
        body, plus, suffix = spec.partition("+")
        strategy, *parts = body.split("-")
        settings: dict = {"strategy": strategy, "align": bool(plus)}
        try:
            if plus and suffix != "align":
                raise ValueError("the only suffix is '+align'")
            for part in parts:
                key, value = _WORDS.get(part), part
                if key is None and (key := _PREFIXES.get(part[:1])) is not None:
                    pattern, kind = _NUMBERS.get(key, _INTEGER)
                    key, value = (key, kind(part[1:])) if pattern.fullmatch(part[1:]) else (None, None)
                if key is None or key in settings:
                    raise ValueError(f"cannot read {part!r}; write {GRAMMAR}")
                settings[key] = value
            return cls(**settings)
        except ValueError as err:
            raise ValueError(f"gathering {spec!r}: {err}") from None


def _plain(value: float) -> str:
    """A number without an exponent (a variant string's parts are split at '-'): 0.25 -> '0.25', 1e-05 -> '0.00001'."""
    return format(Decimal(repr(value)), "f")


def as_gathering_config(config: GatheringConfig | str | None = None, **settings) -> GatheringConfig:
    """``config`` (a GatheringConfig, a variant string or None for the defaults) with ``settings`` (GatheringConfig
    fields) replacing its fields; validated once, by GatheringConfig."""
    names = [f.name for f in fields(GatheringConfig)]
    if unknown := sorted(set(settings) - set(names)):
        raise TypeError(f"unknown gathering setting(s) {unknown}; GatheringConfig has {names}")
    if config is None:
        return GatheringConfig(**settings)
    config = GatheringConfig.from_string(config) if isinstance(config, str) else config
    return replace(config, **settings) if settings else config
