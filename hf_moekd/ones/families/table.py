"""The registry's entries: one per MoE ``model_type`` of transformers (plus the project's V-MoE).

An entry states the dense target and how a token's routing weights add up; structure (where the experts, router
and shared experts are) and checkpoint naming come from the model and transformers' conversion table. Every entry
is driven through the same checks by ``tests/test_families.py`` (tiny checkpoint, gather, stock load, logits).
"""
from __future__ import annotations

from typing import Any, Callable

from transformers import PretrainedConfig

from ..strategies import DenseFFN
from ..vit import dense_vit_config
from .readers import fused_reader, plain_reader
from .registry import MoEFamily, register_family, router_scale
from .stats import sigmoid_router_stats, switch_router_stats

Fields = Callable[[PretrainedConfig, int], dict[str, Any]]


# --------------------------------------------------------------------------- routing sums
def renormalised(c: PretrainedConfig) -> float:
    """Top-k weights renormalised (or a softmax over the top-k logits): they sum to 1."""
    return 1.0


def if_norm_topk(c: PretrainedConfig) -> float | None:
    """1 with ``norm_topk_prob=True``, times ``routed_scaling_factor`` where the config has one; else varies."""
    return router_scale(c) if getattr(c, "norm_topk_prob", False) else None


def eval_token_dropout(c: PretrainedConfig) -> float:
    """NLLB-MoE: renormalised top-2 weights, every expert output times 1 - moe_token_dropout in eval."""
    return 1.0 - c.moe_token_dropout


def varies(c: PretrainedConfig) -> None:
    """Top-k probabilities not renormalised: the sum varies per token (the FFN gets its calibration mean)."""
    return None


# --------------------------------------------------------------------------- dense config fields
def widest(c: PretrainedConfig, width: int, name: str = "intermediate_size") -> int:
    """The dense width: the gathered FFN's or the MoE's own dense layers', whichever is wider (narrower ones are
    zero-padded, exactly)."""
    return max(width, getattr(c, name, 0) or 0)


def all_dense(**fields: Callable[[PretrainedConfig], Any]) -> Fields:
    """``configured`` targets: the given config fields (functions of the MoE config) plus the dense width."""
    return lambda c, w: {**{k: f(c) for k, f in fields.items()}, "intermediate_size": widest(c, w)}


def twin_fields(**extra: Callable[[PretrainedConfig], Any]) -> Fields:
    """``twin`` targets: the dense width plus fields the twin's defaults would get wrong."""
    return lambda c, w: {"intermediate_size": widest(c, w), **{k: f(c) for k, f in extra.items()}}


_layers = lambda c: c.num_hidden_layers  # noqa: E731
_head_dim = lambda c: getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads  # noqa: E731


def _qwen3_layer_types(c: PretrainedConfig) -> list[str]:
    kind = "full_attention" if c.sliding_window is None else "sliding_attention"  # Qwen3-MoE: one mask for all layers
    return [kind] * c.num_hidden_layers


def _t5_fields(c: PretrainedConfig, width: int) -> dict[str, Any]:
    if c.tie_word_embeddings is False:
        raise ValueError("this SwitchTransformers model has an untied lm_head, but T5 in transformers 5 always ties "
                         "lm_head to the shared embedding, so no exact T5 twin exists")
    if "-" in c.dense_act_fn:
        raise ValueError(f"Switch dense_act_fn {c.dense_act_fn!r} has no T5 feed_forward_proj equivalent")
    out = {"feed_forward_proj": c.dense_act_fn, "tie_word_embeddings": True}
    if getattr(c, "decoder_start_token_id", None) is not None:
        out["decoder_start_token_id"] = c.decoder_start_token_id
    return out


def mlp_writer(in_names: list, out_name: str, bias: bool = False):
    """Dense FFN tensor names for custom placements; ``{block}`` = the sparse block, ``{parent}`` = its parent."""

    def write(block: str, ffn: DenseFFN) -> dict:
        fmt = lambda n: n.format(block=block, parent=block.rsplit(".", 1)[0])  # noqa: E731
        out = {f"{fmt(n)}.weight": w for n, w in zip(in_names, ffn.in_proj)}
        out[f"{fmt(out_name)}.weight"] = ffn.out_proj
        if bias and ffn.in_bias is not None:
            out.update({f"{fmt(n)}.bias": b for n, b in zip(in_names, ffn.in_bias)})
        if bias and ffn.out_bias is not None:
            out[f"{fmt(out_name)}.bias"] = ffn.out_bias
        return out

    return write


# --------------------------------------------------------------------------- twins
register_family(MoEFamily(
    "mixtral", "twin", "mistral", renormalised,
    twin_fields(head_dim=_head_dim, sliding_window=lambda c: c.sliding_window),
    notes="Mistral's defaults differ (sliding_window 4096): head_dim and sliding_window are carried over"))
register_family(MoEFamily(
    "qwen2_moe", "twin", "qwen2", if_norm_topk,
    twin_fields(layer_types=lambda c: list(c.layer_types),
                sliding_window=lambda c: c.sliding_window if c.use_sliding_window else None),
    notes="the gated shared expert is folded with its gate's calibration mean (exact only when that gate is "
          "constant); q/k/v biases zero-filled when qkv_bias=False"))
register_family(MoEFamily(
    "qwen3_moe", "twin", "qwen3", if_norm_topk,
    twin_fields(layer_types=_qwen3_layer_types, head_dim=_head_dim, sliding_window=lambda c: c.sliding_window)))
register_family(MoEFamily("granitemoe", "twin", "granite", renormalised, twin_fields()))

# --------------------------------------------------------------------------- configured dense
def configured(model_type: str, field: str, notes: str = "", **kw: Any) -> MoEFamily:
    """A ``configured`` entry whose config turns every layer dense through ``field``: ``first_k_dense_replace`` =
    every layer, or every ``mlp_layer_types`` entry ``"dense"``; top-k renormalised with ``norm_topk_prob``."""
    fields = {"first_k_dense_replace": all_dense(first_k_dense_replace=_layers),
              "mlp_layer_types": all_dense(mlp_layer_types=lambda c: ["dense"] * c.num_hidden_layers)}
    what = {"first_k_dense_replace": "first_k_dense_replace = every layer", "mlp_layer_types": "every mlp_layer_type dense"}
    return register_family(MoEFamily(model_type, "configured", routed_sum=if_norm_topk, dense_fields=fields[field],
                                     notes=f"{what[field]}; shared experts folded (exact){notes}", **kw))


for _t in ("deepseek_v2", "deepseek_v3", "glm4_moe", "dots1"):
    configured(_t, "first_k_dense_replace")
register_family(MoEFamily("ernie4_5_moe", "configured", routed_sum=renormalised,
                          dense_fields=all_dense(moe_layer_start_index=_layers),
                          notes="moe_layer_start_index past the last layer; shared experts folded (exact)"))
for _t in ("exaone_moe", "glm4_moe_lite", "mimo_v2_flash", "dots3_note_text"):
    configured(_t, "mlp_layer_types")
register_family(MoEFamily(
    "llama4_text", "configured", routed_sum=varies, input_scaled=True, router_stats=("router", sigmoid_router_stats),
    dense_fields=lambda c, w: {"moe_layers": [], "intermediate_size_mlp": widest(c, w, "intermediate_size_mlp")},
    notes="no MoE layers; the router's sigmoid score scales the experts' input: folded into the FFN's input weights "
          "with its calibration mean (exact when the score is constant, top-1); shared expert folded (exact)"))
register_family(MoEFamily("jamba", "configured", routed_sum=varies, dense_fields=all_dense(num_experts=lambda c: 1),
                          notes="num_experts = 1 makes every feed-forward a plain MLP"))

# --------------------------------------------------------------------------- one expert inside the MoE's own class
for _t, _sum, _notes in (
    ("gpt_oss", renormalised, "interleaved gate/up with clamp and biases kept as they are"),
    ("olmoe", if_norm_topk, "no dense twin: OLMoE is pre-norm with q/k RMSNorm over full projections; olmo has no "
                            "q/k norm, olmo2/olmo3 are post-norm"),
    ("minimax", renormalised, "lightning-attention hybrid: no dense twin"),
    *((t, varies, "") for t in ("afmoe", "aria_text", "cohere2_moe", "flex_olmo", "flint",
                                "granitemoe_swa", "granitemoeshared", "hunyuan_v1_moe", "inkling_text", "kolibri1",
                                "laguna", "mellum", "minimax_m2", "qwen3_next", "qwen3_5_moe_text", "hy_v3",
                                "lfm2_moe", "granitemoehybrid")),
):
    register_family(MoEFamily(_t, routed_sum=_sum, notes=_notes))
for _t in ("axk1", "axk2", "deepseek_v32", "glm_moe_dsa", "hy_v4", "nemotron_h", "solar_open"):
    register_family(MoEFamily(_t, routed_sum=varies, copies=2,
                              notes="two copies of the gathered expert: the group router scores the top two per group"))
register_family(MoEFamily("qwen4_exp_text", routed_sum=if_norm_topk,
                          notes="indexed-attention / linear-attention hybrid with hyper-connections: no dense twin"))
register_family(MoEFamily("gemma4_text", routed_sum=varies, router_rows=(("router.per_expert_scale", (1.0,)),),
                          notes="the MoE block runs beside the layer's dense MLP (kept); per_expert_scale of the kept "
                                "expert set to 1, the MoE's scales folded with the calibration mean"))
register_family(MoEFamily("zaya", routed_sum=varies, expert_weight=lambda c: 0.5,
                          router_rows=(("gate.balancing_biases", (0.0, -1.0)),),
                          notes="top-1 over the experts and a skip class, not renormalised: the one expert's weight "
                                "is 1/2 (expert and skip logits both zero, the skip class biased away as in the MoE)"))
for _t in ("beam", "minimax_m3_vl_text"):
    register_family(MoEFamily(_t, routed_sum=varies, scale_outside=True, copies=2 if _t == "beam" else 1,
                              notes="routed_scaling_factor applied after the experts' sum, kept by the block"))
for _t in ("bailing_hybrid", "kimi_linear", "deepseek_v4", "inkling2_text"):
    register_family(MoEFamily(_t, routed_sum=varies, streamed=False, copies=2 if _t in ("bailing_hybrid", "kimi_linear") else 1,
                              notes="checkpoint naming needs transformers' conversions: loaded whole, not streamed"))
register_family(MoEFamily("phimoe", routed_sum=varies, exact=False, copies=2, copy_router=True,
                          notes="sparsemixer routing: the weights vary per token and equal logits are degenerate (nan): "
                                "two copies keep the first two router rows; identical experts are not reproduced exactly"))

# --------------------------------------------------------------------------- text towers of multimodal MoEs
# Only a base model (AutoModel) is registered for these configs; a checkpoint's own architecture is kept.
register_family(MoEFamily("qwen3_vl_moe_text", "twin", "qwen3_vl_text", if_norm_topk, twin_fields(),
                          auto_class="AutoModel", notes="Qwen3-VL-MoE's text tower -> Qwen3-VL's dense text model"))
for _t in ("glm4v_moe_text", "mistral4"):
    configured(_t, "first_k_dense_replace", auto_class="AutoModel")
configured("mistral_large4_text", "mlp_layer_types", auto_class="AutoModel")
configured("glm5_next_text", "mlp_layer_types", auto_class="AutoModel", streamed=False,
           notes="; attention tensors need transformers' conversions: loaded whole, not streamed")
register_family(MoEFamily("muse_spark_text", routed_sum=varies, auto_class="AutoModel",
                          notes="the experts' shared post_expert_norm is kept after the one expert: exact for "
                                "identical experts, the norm of the gathered FFN's output otherwise"))
register_family(MoEFamily("openai_privacy_filter", routed_sum=renormalised, auto_class="AutoModelForTokenClassification",
                          notes="top-k weights divided by k and the block's output multiplied by k: the effective "
                                "weights sum to 1 (a bidirectional token classifier)"))

# --------------------------------------------------------------------------- non-fused experts
register_family(MoEFamily(
    "switch_transformers", "twin", "t5", varies, _t5_fields, auto_class="AutoModelForSeq2SeqLM",
    read_experts=plain_reader("experts.expert_{e}", "wi", "wo"),
    write_dense=mlp_writer(["{parent}.DenseReluDense.wi"], "{parent}.DenseReluDense.wo"),
    router_stats=("router", switch_router_stats), dense_renames=((r"\.mlp\.(wi|wo)\.", r".DenseReluDense.\1."),),
    notes="top-1 output scaled by the router probability (0 over expert_capacity): the FFN gets its calibration "
          "mean, exact when that probability is constant"))
register_family(MoEFamily(
    "nllb-moe", "twin", "m2m_100", eval_token_dropout, lambda c, w: {},
    auto_class="AutoModelForSeq2SeqLM", read_experts=plain_reader("experts.expert_{e}", "fc1", "fc2", bias=True),
    write_dense=mlp_writer(["{parent}.fc1"], "{parent}.fc2", bias=True),
    dense_renames=((r"\.ffn\.(fc1|fc2)\.", r".\1."), (r"\.ff_layer_norm\.", ".final_layer_norm."),
                   (r"\.cross_attention\.", ".encoder_attn."),
                   (r"\.cross_attention_layer_norm\.", ".encoder_attn_layer_norm.")),
    notes="top-2 weights renormalised, times 1 - moe_token_dropout in eval: exact in eval while no token exceeds "
          "an expert's capacity (moe_eval_capacity_token_fraction); padding positions, which the MoE zeroes, differ"))
register_family(MoEFamily(
    "vmoe", "twin", "dense_vit", lambda c: 1.0 if c.normalize_topk_weights else None,
    make_config=dense_vit_config, auto_class="AutoModelForImageClassification",
    read_experts=fused_reader("experts.w_in", "experts.w_out", "experts.b_in", "experts.b_out"),
    write_dense=mlp_writer(["{block}.fc1"], "{block}.fc2", bias=True),
    dense_renames=((r"^vmoe\.", "dense_vit."),), input_name="pixel_values",
    notes="the output ships DenseViT's code (auto_map): loads with trust_remote_code=True without hf_moekd"))

__all__ = ["renormalised", "if_norm_topk", "eval_token_dropout", "varies", "all_dense", "configured", "twin_fields", "widest", "mlp_writer"]

# --------------------------------------------------------------------------- refused, with the reason
for _t, _why in (
    ("doge", "Doge's CDMoE experts are single hidden units retrieved by product keys from embedding tables and added "
             "to a dense MLP: there is no expert FFN to gather (its dense MLP already is the dense part)"),
    ("jetmoe", "JetMoE routes attention heads too (mixture of attention heads): a dense attention that reproduces the "
               "routed heads would need an attention merge, which gathering FFN experts does not do"),
    ("longcat_flash", "LongCat-Flash routes tokens to zero-computation experts that return the token itself times "
                      "its weight, which no FFN reproduces, and its experts module is not a transformers fused one "
                      "(gate_up_proj has rows for the zero-computation experts too): a dense model would drop them "
                      "(an approximation, not implemented); needs its own reader and writer"),
):
    register_family(MoEFamily(_t, unsupported=_why))
