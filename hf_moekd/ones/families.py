"""MoE family registry: how each sparse architecture maps onto its dense twin.

A :class:`MoEFamily` says, for one ``model_type``: how to build the dense config, which tensor names
belong to a sparse block (``block_pattern``; every other tensor is copied, renamed by
``dense_renames``), how to read a block's experts as :class:`ExpertWeights` (in-memory fused
``experts.gate_up_proj`` / ``experts.down_proj`` *and* the legacy per-expert on-disk keys, which
``legacy_renames`` normalise first), where the merged FFN goes in the dense model, and how to read
routing statistics from the router's forward output. Families are looked up with
:func:`get_family`; add one with :func:`register_family`.

Families and what is exact (identical experts gathered with average/weighted_average/top_experts give the
MoE's logits to 1e-5 wherever "exact" is said):

* ``mixtral`` -> ``mistral``: exact (top-2 weights renormalised). ``head_dim`` and ``sliding_window``
  are passed explicitly (Mistral's defaults differ: sliding_window 4096). On disk: legacy
  ``block_sparse_moe.experts.{e}.w1/w3/w2`` (what ``save_pretrained`` writes by default) or fused.
* ``qwen2_moe`` -> ``qwen2``: the shared expert is appended to the merged experts' units, its output
  scaled by the mean of ``sigmoid(x·g)`` on calibration tokens (0.5 without data): exact only when that
  gate is constant (e.g. ``g = 0``), otherwise an approximation. ``norm_topk_prob=False`` (the default)
  means the routed weights sum to < 1: with calibration data the FFN is scaled by their mean sum
  (approximate), without it a warning. ``layer_types`` copied; q/k/v biases zero-filled when
  ``qkv_bias=False``; every FFN is zero-padded to the widest (dense ``mlp_only_layers``), exactly.
* ``qwen3_moe`` -> ``qwen3``: exact with ``norm_topk_prob=True`` (same scaling note otherwise);
  ``head_dim`` explicit (Qwen3's default is 128); one sliding/full mask for all layers, as in Qwen3-MoE.
* ``switch_transformers`` -> ``t5``: sparse FF layers merged, dense ones copied
  (``mlp.wi/wo`` -> ``DenseReluDense.wi/wo``). Top-1 routing multiplies the expert output by the
  router probability (0 for tokens over ``expert_capacity``): the FFN is scaled by its calibration mean,
  exact when that probability is constant. Untied ``lm_head`` refused (T5 in transformers 5 always ties).
* ``olmoe``: refused, no dense architecture in transformers matches (see its ``unsupported`` text).

* ``vmoe`` -> ``dense_vit`` (the project's image models, ``hf_moekd.models``): exact with
  ``normalize_topk_weights=True`` (the default). The output ships DenseViT's code (``auto_map``), so it loads
  with ``AutoModelForImageClassification.from_pretrained(dir, trust_remote_code=True)`` without hf_moekd.
"""
from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from transformers import PretrainedConfig

from .strategies import DenseFFN, ExpertWeights
from .vit import dense_vit_config

__all__ = [
    "MoEFamily", "RoutingStats", "BlockReader", "FAMILIES", "register_family", "get_family", "copy_fields",
    "gated_reader", "plain_reader", "fused_reader", "mlp_writer", "topk_router_stats", "switch_router_stats",
    "logits_router_stats",
]


# --------------------------------------------------------------------------- routing statistics
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


StatFn = Callable[[Any, "Tensor | None", RoutingStats], None]


def _masked(t: Tensor, mask: Tensor | None) -> Tensor:
    """Flatten the token axes of ``t`` ([..., D] -> [T, D]) and keep the tokens where ``mask`` is set."""
    t = t.reshape(-1, t.shape[-1])
    return t if mask is None or mask.numel() != t.shape[0] else t[mask]


def topk_router_stats(out: Any, mask: Tensor | None, st: RoutingStats) -> None:
    """Routers returning ``(logits, top-k weights [T, k], top-k indices [T, k])`` (Mixtral, Qwen-MoE, OLMoE)."""
    scores, idx = _masked(out[1].float(), mask), _masked(out[2], mask)
    st.counts += torch.bincount(idx.flatten(), minlength=st.num_experts)[: st.num_experts].double()
    st.tokens += idx.shape[0]
    st.routed_mass += float(scores.sum())


def switch_router_stats(out: Any, mask: Tensor | None, st: RoutingStats) -> None:
    """Switch routers returning ``(capacity-masked one-hot [B,S,E], top-1 prob [B,S,1], logits)``."""
    dispatch, prob = _masked(out[0].float(), mask), _masked(out[1].float(), mask)
    st.counts += dispatch.sum(0).double()
    st.tokens += dispatch.shape[0]
    st.routed_mass += float((prob[:, 0] * dispatch.sum(-1)).sum())  # dropped tokens get no expert output


def logits_router_stats(top_k: Callable[[PretrainedConfig], int] | int, normalize: bool) -> Callable[[PretrainedConfig], StatFn]:
    """Stats for a plain Linear router returning logits: softmax, then top-k (renormalised if ``normalize``)."""

    def make(config: PretrainedConfig) -> StatFn:
        k = top_k(config) if callable(top_k) else top_k

        def stat(out: Any, mask: Tensor | None, st: RoutingStats) -> None:
            probs = _masked(out[0] if isinstance(out, tuple) else out, mask).float().softmax(-1)
            w, idx = probs.topk(k, dim=-1)
            w = w / w.sum(-1, keepdim=True) if normalize else w
            topk_router_stats((None, w, idx), None, st)

        return stat

    return make


def shared_gate_stats(out: Tensor, mask: Tensor | None, st: RoutingStats) -> None:
    """Qwen2-MoE ``shared_expert_gate`` output: accumulate sigmoid(x·g)."""
    st.extras["shared_gate"] = st.extras.get("shared_gate", 0.0) + float(_masked(out.float(), mask).sigmoid().sum())


# --------------------------------------------------------------------------- reading / writing experts
class BlockReader:
    """The tensors of one sparse block, addressed by names relative to the block prefix."""

    def __init__(self, prefix: str, names: Iterable[str], get: Callable[[str], Tensor], where: str) -> None:
        self.prefix, self.names, self._get, self.where = prefix, set(names), get, where

    def has(self, name: str) -> bool:
        return name in self.names

    def get(self, name: str) -> Tensor:
        self.require([name])
        return self._get(name)

    def require(self, names: Iterable[str]) -> None:
        if missing := [n for n in names if n not in self.names]:
            shown = ", ".join(f"{self.prefix}.{n}" for n in missing[:4]) + (" ..." if len(missing) > 4 else "")
            raise ValueError(f"missing expert tensor(s) {shown} in {self.where} ({len(missing)} missing); the checkpoint is incomplete")


Reader = Callable[[BlockReader, PretrainedConfig], ExpertWeights]


def gated_reader(gate: str, up: str, down: str) -> Reader:
    """Gated experts: fused ``experts.gate_up_proj [E, 2I, H]`` (gate rows first) + ``experts.down_proj``,
    or the legacy per-expert keys ``experts.{e}.{gate|up|down}.weight``."""

    def read(r: BlockReader, config: PretrainedConfig) -> ExpertWeights:
        if r.has("experts.gate_up_proj") or r.has("experts.down_proj"):
            gate_up, down_w = r.get("experts.gate_up_proj"), r.get("experts.down_proj")
            i = gate_up.shape[1] // 2
            return ExpertWeights([gate_up[:, :i], gate_up[:, i:]], down_w)
        stack = _stacker(r, config.num_experts)
        return ExpertWeights([stack(f"experts.{{e}}.{gate}.weight"), stack(f"experts.{{e}}.{up}.weight")],
                             stack(f"experts.{{e}}.{down}.weight"))

    return read


def plain_reader(expert: str, w_in: str, w_out: str) -> Reader:
    """Per-expert two-matrix FFNs, e.g. Switch ``experts.expert_{e}.wi / wo``."""

    def read(r: BlockReader, config: PretrainedConfig) -> ExpertWeights:
        stack = _stacker(r, config.num_experts)
        return ExpertWeights([stack(f"{expert}.{w_in}.weight")], stack(f"{expert}.{w_out}.weight"))

    return read


def fused_reader(w_in: str, w_out: str, b_in: str | None = None, b_out: str | None = None) -> Reader:
    """Fused plain experts: ``w_in [E, I, H]``, ``w_out [E, H, I]``, optional ``b_in [E, I]``, ``b_out [E, H]``."""

    def read(r: BlockReader, config: PretrainedConfig) -> ExpertWeights:
        return ExpertWeights([r.get(w_in)], r.get(w_out), None if b_in is None else [r.get(b_in)],
                             None if b_out is None else r.get(b_out))

    return read


def _stacker(r: BlockReader, num_experts: int) -> Callable[[str], Tensor]:
    def stack(pattern: str) -> Tensor:
        names = [pattern.format(e=e) for e in range(num_experts)]
        r.require(names)
        first = r.get(names[0])
        out = first.new_empty((len(names), *first.shape))  # filled one expert at a time: no second copy
        out[0] = first
        for e, n in enumerate(names[1:], 1):
            out[e] = r.get(n)
        return out

    return stack


Writer = Callable[[str, DenseFFN], dict[str, Tensor]]


def _name(fmt: Any, block: str) -> str:
    return fmt(block) if callable(fmt) else fmt.format(block=block, parent=block.rsplit(".", 1)[0])


def mlp_writer(in_names: list, out_name: Any, bias: bool = False) -> Writer:
    """Dense FFN tensor names; formats may use ``{block}`` (the sparse block) and ``{parent}`` (its parent)."""

    def write(block: str, ffn: DenseFFN) -> dict[str, Tensor]:
        out = {f"{_name(n, block)}.weight": w for n, w in zip(in_names, ffn.in_proj)}
        out[f"{_name(out_name, block)}.weight"] = ffn.out_proj
        if bias and ffn.in_bias is not None:
            out.update({f"{_name(n, block)}.bias": b for n, b in zip(in_names, ffn.in_bias)})
        if bias and ffn.out_bias is not None:
            out[f"{_name(out_name, block)}.bias"] = ffn.out_bias
        return out

    return write


# --------------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class MoEFamily:
    """How one sparse MoE architecture (``model_type``) becomes its dense twin."""

    model_type: str
    class_prefix: tuple[str, str]  # MoE / dense class-name prefix, e.g. ("Mixtral", "Mistral")
    block_pattern: str  # regex matching every tensor name of a sparse block; group "block" = its prefix
    dense_config: Callable[[PretrainedConfig], PretrainedConfig]
    read_experts: Reader
    write_dense: Writer
    auto_class: str = "AutoModelForCausalLM"
    router: str = "gate"  # router submodule of a block, hooked for usage statistics
    router_stats: Callable[[PretrainedConfig], StatFn] = lambda c: topk_router_stats
    extra_hooks: dict[str, StatFn] = field(default_factory=dict)  # other block submodules to hook
    renormalized: Callable[[PretrainedConfig], bool] = lambda c: True  # routing weights of a token sum to 1?
    fold: Callable[[DenseFFN, BlockReader, "RoutingStats | None", PretrainedConfig], DenseFFN] | None = None
    legacy_renames: tuple[tuple[str, str], ...] = ()  # on-disk name fragment -> in-memory name fragment
    dense_renames: tuple[tuple[str, str], ...] = ()  # regex substitutions for copied (non-expert) names
    top_k: Callable[[PretrainedConfig], int] = lambda c: getattr(c, "num_experts_per_tok", 1)
    input_name: str = "input_ids"  # model input that bare calibration tensors are passed as
    unsupported: str | None = None  # why no exact dense twin exists (gathering then refuses)

    def normalize(self, name: str) -> str:
        for old, new in self.legacy_renames:
            name = name.replace(old, new)
        return name

    def dense_name(self, name: str) -> str:
        for pat, rep in self.dense_renames:
            name = re.sub(pat, rep, name)
        return name

    def block_of(self, name: str) -> str | None:
        m = re.match(self.block_pattern, name)
        return m.group("block") if m else None


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


# --------------------------------------------------------------------------- dense configs
def copy_fields(src: PretrainedConfig, dense_cls: type, drop: Iterable[str] = ()) -> dict[str, Any]:
    """Every field of ``dense_cls`` that ``src`` also has (deep-copied), minus bookkeeping fields."""
    skip = {"architectures", "transformers_version", *drop}
    names = [f.name for f in dataclasses.fields(dense_cls) if f.name not in skip]
    return {n: copy.deepcopy(getattr(src, n)) for n in names if hasattr(src, n)}


def _sparse_layers(c: PretrainedConfig) -> list[bool]:
    """Qwen-MoE rule: which decoder layers hold a sparse block."""
    only = set(c.mlp_only_layers or [])
    return [i not in only and c.num_experts > 0 and (i + 1) % c.decoder_sparse_step == 0 for i in range(c.num_hidden_layers)]


def _qwen_width(c: PretrainedConfig, sparse_width: int) -> int:
    """One dense width for every layer: the widest FFN; narrower ones are zero-padded (exact)."""
    return max(sparse_width if s else c.intermediate_size for s in _sparse_layers(c))


def _mistral_config(c: PretrainedConfig) -> PretrainedConfig:
    from transformers import MistralConfig

    kw = copy_fields(c, MistralConfig)
    kw.update(head_dim=c.head_dim or c.hidden_size // c.num_attention_heads, sliding_window=c.sliding_window,
              intermediate_size=c.intermediate_size)
    return MistralConfig(**kw)


def _qwen2_config(c: PretrainedConfig) -> PretrainedConfig:
    from transformers import Qwen2Config

    kw = copy_fields(c, Qwen2Config)
    kw.update(intermediate_size=_qwen_width(c, c.moe_intermediate_size + c.shared_expert_intermediate_size),
              layer_types=list(c.layer_types), sliding_window=c.sliding_window if c.use_sliding_window else None)
    if getattr(c, "head_dim", None):
        kw["head_dim"] = c.head_dim
    return Qwen2Config(**kw)


def _qwen3_config(c: PretrainedConfig) -> PretrainedConfig:
    from transformers import Qwen3Config

    kw = copy_fields(c, Qwen3Config)
    kind = "full_attention" if c.sliding_window is None else "sliding_attention"  # Qwen3-MoE: one mask for all layers
    kw.update(intermediate_size=_qwen_width(c, c.moe_intermediate_size), layer_types=[kind] * c.num_hidden_layers,
              head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
              sliding_window=c.sliding_window)
    return Qwen3Config(**kw)


def _t5_config(c: PretrainedConfig) -> PretrainedConfig:
    from transformers import T5Config

    if c.tie_word_embeddings is False:
        raise ValueError("this SwitchTransformers model has an untied lm_head, but T5 in transformers 5 always ties "
                         "lm_head to the shared embedding, so no exact T5 twin exists")
    if "-" in c.dense_act_fn:
        raise ValueError(f"Switch dense_act_fn {c.dense_act_fn!r} has no T5 feed_forward_proj equivalent")
    kw = copy_fields(c, T5Config)
    kw.update(feed_forward_proj=c.dense_act_fn, tie_word_embeddings=True)
    if getattr(c, "decoder_start_token_id", None) is not None:
        kw["decoder_start_token_id"] = c.decoder_start_token_id
    return T5Config(**kw)


def _fold_shared_expert(ffn: DenseFFN, r: BlockReader, st: RoutingStats | None, c: PretrainedConfig) -> DenseFFN:
    """Qwen2-MoE: append the shared expert's units, its output scaled by the mean of sigmoid(x·g)
    over calibration tokens (0.5 = sigmoid(0) without data). Exact only when that gate is constant."""
    scale = st.mean("shared_gate") if st is not None else None
    scale = 0.5 if scale is None else scale
    f32 = lambda n: r.get(n).to(torch.float32)  # noqa: E731
    shared = DenseFFN([f32("shared_expert.gate_proj.weight"), f32("shared_expert.up_proj.weight")],
                      f32("shared_expert.down_proj.weight"))
    return ffn.concat(shared.scale_output(scale))


_GATED_WRITER = mlp_writer(["{block}.gate_proj", "{block}.up_proj"], "{block}.down_proj")

register_family(MoEFamily(
    model_type="mixtral", class_prefix=("Mixtral", "Mistral"),
    block_pattern=r"^(?P<block>(?:.*\.)?layers\.\d+\.mlp)\.(?:gate|experts)\.",
    dense_config=_mistral_config, read_experts=gated_reader("w1", "w3", "w2"), write_dense=_GATED_WRITER,
    legacy_renames=((".block_sparse_moe.", ".mlp."),),
))
register_family(MoEFamily(
    model_type="qwen2_moe", class_prefix=("Qwen2Moe", "Qwen2"),
    block_pattern=r"^(?P<block>(?:.*\.)?layers\.\d+\.mlp)\.(?:gate|experts|shared_expert|shared_expert_gate)\.",
    dense_config=_qwen2_config, read_experts=gated_reader("gate_proj", "up_proj", "down_proj"),
    write_dense=_GATED_WRITER, extra_hooks={"shared_expert_gate": shared_gate_stats},
    renormalized=lambda c: bool(c.norm_topk_prob), fold=_fold_shared_expert,
))
register_family(MoEFamily(
    model_type="qwen3_moe", class_prefix=("Qwen3Moe", "Qwen3"),
    block_pattern=r"^(?P<block>(?:.*\.)?layers\.\d+\.mlp)\.(?:gate|experts)\.",
    dense_config=_qwen3_config, read_experts=gated_reader("gate_proj", "up_proj", "down_proj"),
    write_dense=_GATED_WRITER, renormalized=lambda c: bool(c.norm_topk_prob),
))
register_family(MoEFamily(
    model_type="switch_transformers", class_prefix=("SwitchTransformers", "T5"), auto_class="AutoModelForSeq2SeqLM",
    block_pattern=r"^(?P<block>(?:.*\.)?(?:encoder|decoder)\.block\.\d+\.layer\.\d+\.mlp)\.(?:router|experts)\.",
    dense_config=_t5_config, read_experts=plain_reader("experts.expert_{e}", "wi", "wo"),
    write_dense=mlp_writer(["{parent}.DenseReluDense.wi"], "{parent}.DenseReluDense.wo"),
    router="router", router_stats=lambda c: switch_router_stats, renormalized=lambda c: False,
    dense_renames=((r"\.mlp\.(wi|wo)\.", r".DenseReluDense.\1."),),
))
register_family(MoEFamily(
    model_type="olmoe", class_prefix=("Olmoe", "Olmo"),
    block_pattern=r"^(?P<block>(?:.*\.)?layers\.\d+\.mlp)\.(?:gate|experts)\.",
    dense_config=lambda c: None, read_experts=gated_reader("gate_proj", "up_proj", "down_proj"),
    write_dense=_GATED_WRITER, renormalized=lambda c: bool(c.norm_topk_prob),
    unsupported="no dense architecture in transformers matches OLMoE exactly: OLMoE is pre-norm with RMSNorm on "
                "the full q/k projections; 'olmo' has no q/k norm and a non-parametric LayerNorm, while 'olmo2' "
                "and 'olmo3' put their norms after attention/MLP (post-norm)",
))
register_family(MoEFamily(
    model_type="vmoe", class_prefix=("VMoE", "DenseViT"), auto_class="AutoModelForImageClassification",
    block_pattern=r"^(?P<block>(?:.*\.)?layer\.\d+\.mlp)\.(?:router|experts)\.",
    dense_config=dense_vit_config,
    read_experts=fused_reader("experts.w_in", "experts.w_out", "experts.b_in", "experts.b_out"),
    write_dense=mlp_writer(["{block}.fc1"], "{block}.fc2", bias=True),
    router="router.gate", router_stats=logits_router_stats(top_k=lambda c: c.num_experts_per_tok, normalize=True),
    renormalized=lambda c: bool(c.normalize_topk_weights), dense_renames=((r"^vmoe\.", "dense_vit."),),
    input_name="pixel_values",
))
