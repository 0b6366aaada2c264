"""OneS knowledge gathering: merge a sparse MoE's experts into a dense twin model (arXiv 2201.10890).

>>> from hf_moekd.gathering import gather_experts
>>> dense = gather_experts("path/to/mixtral", strategy="weighted_average", output_dir="mistral-gathered")
"""
from ..cards import CardMethod, register_card_method
from .families import FAMILIES, MoEFamily, RoutingStats, get_family, register_family
from .gather import collect_routing_stats, gather_experts
from .strategies import (
    MERGE_STRATEGIES,
    DenseFFN,
    ExpertWeights,
    align_experts,
    merge_experts,
    register_strategy,
)
from .variants import Gathering, parse_gathering

register_card_method(CardMethod("gathering", "OneS knowledge gathering (no training)",
                                ("knowledge-gathering", "mixture-of-experts")))

__all__ = [
    "gather_experts", "collect_routing_stats", "merge_experts", "align_experts", "register_strategy",
    "MERGE_STRATEGIES", "ExpertWeights", "DenseFFN", "FAMILIES", "MoEFamily", "RoutingStats",
    "get_family", "register_family", "Gathering", "parse_gathering",
]
