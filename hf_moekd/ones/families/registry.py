"""The MoE architecture registry: one :class:`MoEFamily` entry per ``model_type`` says how it becomes dense.

Three kinds of dense target, in this order of preference (``MoEFamily.target``):

* ``twin``: the family's own dense twin in transformers, same attention and norms (Mixtral -> Mistral,
  Qwen3-MoE -> Qwen3, Granite-MoE -> Granite, ...). Shared experts are folded into the dense FFN.
* ``configured``: the same class configured dense, where its config can say so (DeepSeek-V2/V3, GLM-4-MoE:
  ``first_k_dense_replace`` = every layer; Jamba: one expert = a plain MLP). Shared experts folded.
* ``one_expert``: the same class with one expert and top-1: a one-expert MoE is a dense FFN inside a stock class
  (GPT-OSS, OLMoE, Phi-MoE, MiniMax, ...). Router, shared experts and everything else stay as they are; the router
  is zeroed (one expert: its weight is 1 after softmax or renormalisation).

Where each block's experts are is read from the model itself (:func:`hf_moekd.model_utils.moe_layout.moe_blocks`),
how a checkpoint names them from transformers' conversion table (:mod:`.readers`): an entry holds only what differs
between families. The written config records the target under ``hf_moekd_gathering``.
"""
from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from torch import Tensor
from transformers import PretrainedConfig

from ..strategies import DenseFFN
from .readers import Reader, disk_renames, fused_or_per_expert
from .stats import StatFn

__all__ = ["MoEFamily", "FAMILIES", "TARGETS", "register_family", "get_family", "copy_fields", "one_expert_fields",
           "router_scale"]

TARGETS = ("twin", "configured", "one_expert")
Writer = Callable[[str, DenseFFN], dict[str, Tensor]]

_COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
_TOPK_FIELDS = ("num_experts_per_tok", "moe_topk", "moe_k", "num_activated_experts", "top_k_experts")


@dataclass(frozen=True)
class MoEFamily:
    """How one sparse MoE architecture (``model_type``) becomes a dense model that stock transformers loads."""

    model_type: str
    target: str = "one_expert"
    dense_type: str | None = None
    """``twin``: the dense twin's model_type (its config class comes from ``CONFIG_MAPPING``)."""
    routed_sum: Callable[[PretrainedConfig], "float | None"] = lambda c: None
    """A token's summed routing weights when the same for every token (1.0 when renormalised; DeepSeek-V3:
    ``routed_scaling_factor``), else None: the dense FFN is then scaled by its calibration mean."""
    dense_fields: Callable[[PretrainedConfig, int], dict[str, Any]] = lambda c, width: {}
    """Config fields of the dense model, given the MoE config and the widest gathered FFN (shared experts included)."""
    make_config: Callable[[PretrainedConfig], PretrainedConfig] | None = None
    """Builds the dense config outright (instead of ``dense_fields``), for twins outside transformers."""
    input_scaled: bool = False
    """The routing weight multiplies the experts' *input* (Llama-4): the dense FFN's input weights get the weight's
    calibration mean (exact for top-1 routing whose weight is the same for every token)."""
    scale_outside: bool = False
    """The block multiplies the experts' sum by ``routed_scaling_factor`` itself (not inside the routing weights)."""
    streamed: bool = True
    """False: checkpoints are loaded whole with ``from_pretrained`` (their naming needs conversions beyond renames)."""
    copy_router: bool = False
    """``one_expert``: the router keeps its first rows (instead of zero rows): for routers degenerate on equal logits."""
    router_rows: tuple[tuple[str, tuple[float, ...]], ...] = ()
    """``one_expert``: values of expert-indexed router tensors (names relative to the block) in the dense model,
    where zero rows would be wrong: Gemma-4's ``router.per_expert_scale`` (1: the kept expert's weight is 1, the
    MoE's scales are in the FFN's calibration mean), ZAYA's ``gate.balancing_biases`` (its skip class keeps -1)."""
    expert_weight: Callable[[PretrainedConfig], float] | None = None
    """``one_expert``: the weight the dense model's router gives its one expert, where not 1 x the routed scaling
    factor (ZAYA: a softmax over the expert and its skip class, both logits zero: 1/2)."""
    copies: int = 1
    """``one_expert``: experts in the dense model, each a copy of the gathered FFN (2 where the router needs two
    per group, DeepSeek-V3-style group scores: with renormalised top-1 weights the copies compute exactly one FFN)."""
    auto_class: str = "AutoModelForCausalLM"
    read_experts: Reader | None = None
    """How to read a block's experts; None: transformers' fused experts (fused or per-expert tensors)."""
    write_dense: Writer | None = None
    """Where a block's merged FFN goes in a twin / configured model; None: the dense MLP of the same layer."""
    router_stats: tuple[str, StatFn] | None = None
    """``(block submodule, hook)`` for families whose experts are not called with the routing (Switch)."""
    dense_renames: tuple[tuple[str, str], ...] = ()
    """Regex substitutions for copied (non-expert) tensor names in the dense model (twins that rename modules)."""
    input_name: str = "input_ids"
    exact: bool = True
    """Identical experts give the MoE's logits (where the routing sum is constant); False: an approximation."""
    notes: str = ""
    """What is exact and what is approximated (shown in the docs' family table)."""
    unsupported: str | None = None
    """Why no dense model in transformers can express the gathered model (gathering then refuses)."""

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"target {self.target!r} is not one of {TARGETS}")
        if self.target == "twin" and not self.dense_type:
            raise ValueError(f"{self.model_type}: a twin target needs dense_type")

    # ---- what the docs' family table shows (utils/render_docs.py)
    @property
    def dense_target(self) -> str | None:
        return None if self.unsupported else (self.dense_type if self.target == "twin" else self.model_type)

    @property
    def how(self) -> str | None:
        if self.unsupported:
            return None
        copies = f" ({self.copies} copies)" if self.copies > 1 else ""
        return {"twin": "dense twin", "configured": "same class, configured dense",
                "one_expert": f"same class, one expert{copies}"}[self.target]

    @property
    def exactness(self) -> str | None:
        """When identical experts give the MoE's logits."""
        if self.unsupported:
            return None
        if not self.exact:
            return "no (approximation)"
        return {"renormalised": "yes", "if_norm_topk": "with norm_topk_prob=True (else: calibration mean)",
                "eval_token_dropout": "in eval, while no token exceeds an expert's capacity"}.get(
            getattr(self.routed_sum, "__name__", ""), "when a token's routing sum is constant (calibration mean folded)")

    @property
    def shared_experts(self) -> str | None:
        if self.unsupported or self.read_experts is not None:
            return None
        return "kept in place (exact)" if self.target == "one_expert" else \
            "folded into the FFN (exact; a sigmoid-gated one: its calibration mean)"

    @property
    def quantised(self) -> str | None:
        if self.unsupported or self.read_experts is not None:
            return None
        return "FP8 block / MXFP4 dequantised on read" if self.streamed else "loaded whole by transformers"

    def normalize(self, name: str) -> str:
        """An on-disk tensor name as the in-memory model names it."""
        for pattern, repl in disk_renames(self.model_type):
            name = re.sub(pattern, repl, name)
        return name

    def dense_name(self, name: str) -> str:
        for pattern, repl in self.dense_renames:
            name = re.sub(pattern, repl, name)
        return name

    def top_k(self, config: PretrainedConfig) -> int:
        """Experts per token."""
        return next((int(v) for f in _TOPK_FIELDS if isinstance(v := getattr(config, f, None), int)), 1)

    def own_weight(self, config: PretrainedConfig) -> float:
        """The weight a ``one_expert`` model's router gives its expert: renormalised 1 times its scaling factor."""
        if self.expert_weight is not None:
            return self.expert_weight(config)
        return 1.0 if self.scale_outside else router_scale(config)

    def reader(self) -> Reader:
        return self.read_experts or fused_or_per_expert(self.model_type)

    def dense_config(self, config: PretrainedConfig, width: int = 0) -> PretrainedConfig:
        """The dense model's config; ``width``: the widest gathered FFN of any block (shared experts included; 0:
        the MoE config's own width)."""
        fields = self.dense_fields(config, width)
        if self.make_config is not None:
            dense = self.make_config(config)
        elif self.target == "twin":
            from transformers import CONFIG_MAPPING

            cls = CONFIG_MAPPING[self.dense_type]
            dense = cls(**{**copy_fields(config, cls), **fields})
        else:
            base = one_expert_fields(config, self.copies) if self.target == "one_expert" else {}
            dense = type(config).from_dict({**_plain_dict(config), **base, **fields})
        dense._attn_implementation = getattr(config, "_attn_implementation", None)
        return dense


def router_scale(config: PretrainedConfig) -> float:
    """The factor a router multiplies its renormalised top-k weights by (``routed_scaling_factor``, 1 if none)."""
    return float(next((v for f in ("routed_scaling_factor", "router_scaling_factor") if (v := getattr(config, f, None))), 1.0))


def _plain_dict(config: PretrainedConfig) -> dict[str, Any]:
    out = config.to_dict()
    for key in ("architectures", "transformers_version", "quantization_config", "auto_map"):
        out.pop(key, None)
    return out


def one_expert_fields(config: PretrainedConfig, copies: int = 1) -> dict[str, Any]:
    """Config fields that leave ``copies`` experts, top-1, one expert group, renormalised routing weights."""
    out: dict[str, Any] = {f: copies for f in _COUNT_FIELDS if getattr(config, f, None)}
    out.update({f: 1 for f in _TOPK_FIELDS if isinstance(getattr(config, f, None), int)})
    out.update({f: 1 for f in ("n_group", "topk_group") if getattr(config, f, None)})
    if hasattr(config, "norm_topk_prob"):
        out["norm_topk_prob"] = True
    return out


def copy_fields(src: PretrainedConfig, dense_cls: type, drop: Iterable[str] = ()) -> dict[str, Any]:
    """Every field of ``dense_cls`` that ``src`` also has (deep-copied), minus bookkeeping fields."""
    skip = {"architectures", "transformers_version", "quantization_config", *drop}
    names = [f.name for f in dataclasses.fields(dense_cls) if f.name not in skip]
    return {n: copy.deepcopy(getattr(src, n)) for n in names if hasattr(src, n)}


FAMILIES: dict[str, MoEFamily] = {}


def register_family(family: MoEFamily) -> MoEFamily:
    FAMILIES[family.model_type] = family
    return family


def get_family(model_type: str) -> MoEFamily:
    if model_type not in FAMILIES:
        raise ValueError(f"knowledge gathering does not support model_type {model_type!r}; supported: {sorted(FAMILIES)}")
    family = FAMILIES[model_type]
    if family.unsupported:
        raise ValueError(f"cannot gather {model_type!r} into a dense model: {family.unsupported}")
    return family
