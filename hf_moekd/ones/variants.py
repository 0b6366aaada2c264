"""Gathering variants written `<strategy>[-r<rank>][+align]`, e.g. `svd`, `svd-r16+align`, `top_experts`, `weighted_average+align`."""
from __future__ import annotations

from dataclasses import dataclass

from .strategies import MERGE_STRATEGIES


@dataclass(frozen=True)
class Gathering:
    strategy: str
    rank: int | None = None
    align: bool = False


def parse_gathering(spec: str) -> Gathering:
    """`svd-r16+align` -> Gathering('svd', 16, True); a clear error for unknown strategies or bad ranks."""
    body, _, suffix = spec.partition("+")
    if suffix not in {"", "align"}:
        raise ValueError(f"gathering {spec!r}: the only suffix is '+align'.")
    strategy, has_rank, rank = body.partition("-r")
    if strategy not in MERGE_STRATEGIES:
        raise ValueError(f"gathering {spec!r}: unknown strategy {strategy!r}; choose one of {sorted(MERGE_STRATEGIES)}.")
    if has_rank and (strategy != "svd" or not rank.isdigit() or int(rank) < 1):
        raise ValueError(f"gathering {spec!r}: a rank is written `svd-r<int>` with an int >= 1 (svd only).")
    return Gathering(strategy, int(rank) if rank else None, bool(suffix))
