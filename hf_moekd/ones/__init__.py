"""OneS ("One Student Knows All Experts Know", arXiv 2201.10890): knowledge gathering merges a sparse MoE's experts
into a dense twin model, then distillation with the MoE as teacher removes the gathering's noise.

>>> from hf_moekd.ones import GatheringConfig, gather_experts
>>> dense = gather_experts("path/to/mixtral", strategy="weighted_average", output_dir="mistral-gathered")
>>> dense = gather_experts(moe, GatheringConfig(strategy="svd", rank=16, align=True))  # or "svd-r16+align"

* `gather`: the checkpoint-to-checkpoint gathering (`gather_experts`), streamed layer by layer;
* `strategies`: the merge formulas (registered, `register_strategy`); `families`: the MoE architecture registry,
  one entry per model_type saying which dense model it becomes (twin, configured dense, one expert;
  `register_family`); `quantized`: FP8 / MXFP4 checkpoint weights dequantised on read;
* `vit`: the V-MoE -> DenseViT pair of the project's image models (dense config, twin with the non-expert weights);
* `config`: `GatheringConfig`, the settings of a gathering (also written `svd-r16+align`); `cli`: `hf-moekd gather`;
* `report`: the study's table and the "% of MoE benefit"; `card`: the method's card sections.
The image study end to end is `hf_moekd.studies.ones`.
"""
from . import card as _card  # noqa: F401  (registers the card sections)
from .config import GatheringConfig
from .families import FAMILIES, MoEFamily, RoutingStats, get_family, register_family
from .gather import collect_routing_stats, gather_experts
from .report import OneSReport, benefit_preserved
from .strategies import (
    DEFAULT_STRATEGY,
    MERGE_STRATEGIES,
    DenseFFN,
    ExpertWeights,
    align_experts,
    merge_experts,
    register_strategy,
)

__all__ = [
    "gather_experts", "collect_routing_stats", "merge_experts", "align_experts", "register_strategy",
    "MERGE_STRATEGIES", "DEFAULT_STRATEGY", "ExpertWeights", "DenseFFN", "FAMILIES", "MoEFamily", "RoutingStats",
    "get_family", "register_family", "GatheringConfig", "OneSReport", "benefit_preserved",
]
