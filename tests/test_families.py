"""Every MoE family of the registry through the same checks (transformers' model-tester convention).

Per family: a tiny random checkpoint with identical experts, saved as several safetensors shards in the published
naming, gathered from disk; the dense model has the MoE's logits (relative max error <= 1e-4) wherever the family's
routing weights sum to a constant (families whose sum varies get a zero router, so every token's sum is the same,
and calibration data); a fresh interpreter without hf_moekd loads every output with a stock Auto class and
generates. Distinct experts + calibration data run every strategy.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers as tf
from testing_utils import fresh_process_logits, tiny_moe_config, tiny_moe_lm

from hf_moekd.model_utils.moe_layout import moe_blocks
from hf_moekd.ones import gather_experts
from hf_moekd.ones.families import FAMILIES
from hf_moekd.ones.strategies import MERGE_STRATEGIES

LM_FAMILIES = sorted(t for t, f in FAMILIES.items() if not f.unsupported and f.read_experts is None)
IDS = torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(1))
_EXPERT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def _auto(model_type: str) -> str:
    """The Auto class the tiny model of a family loads with: a causal LM, or the base model (text towers of
    multimodal MoEs and encoders, which transformers registers only as base models)."""
    return "AutoModelForCausalLM" if FAMILIES[model_type].auto_class == "AutoModelForCausalLM" else "AutoModel"


def _output(model, ids):
    """Logits of a causal LM, the last hidden state of a base model."""
    out = model(input_ids=ids)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _varies(model_type: str) -> bool:
    family = FAMILIES[model_type]
    return family.exact and family.routed_sum(tiny_moe_config(model_type)) is None


@pytest.fixture(scope="module")
def gathered(tmp_path_factory):
    """model_type -> (output folder, MoE logits, exact?) for every family, gathered from sharded checkpoints."""
    root, out = tmp_path_factory.mktemp("families"), {}
    for model_type in LM_FAMILIES:
        varies = _varies(model_type)
        moe = tiny_moe_lm(model_type, zero_router=varies)
        assert moe_blocks(moe), f"{model_type}: the tiny model has no sparse block"
        ckpt, dense_dir = root / model_type, root / f"{model_type}-dense"
        moe.save_pretrained(ckpt, max_shard_size="200KB")
        gather_experts(ckpt, "weighted_average", calibration_dataset=[IDS] if varies else None, output_dir=dense_dir,
                       progress=False, return_model=False)
        with torch.no_grad():
            out[model_type] = (dense_dir, _output(moe, IDS), FAMILIES[model_type].exact)
    return out


@pytest.mark.parametrize("model_type", LM_FAMILIES)
def test_gathered_checkpoint_matches_moe(gathered, model_type):
    folder, ref, exact = gathered[model_type]
    assert len(list((folder.parent / model_type).glob("model-*.safetensors"))) > 1  # the source really was sharded
    config = json.loads((folder / "config.json").read_text())
    family = FAMILIES[model_type]
    assert config["hf_moekd_gathering"]["target"] == family.target
    if family.target == "twin":
        assert config["model_type"] == family.dense_type
    if family.target == "one_expert":
        assert [config[f] for f in _EXPERT_FIELDS if config.get(f)] in ([family.copies], [family.copies] * 2)
    dense = getattr(tf, _auto(model_type)).from_pretrained(folder).eval()
    with torch.no_grad():
        logits = _output(dense, IDS)
    assert torch.isfinite(logits).all()
    err = ((logits - ref).abs().max() / ref.abs().max()).item()
    if exact:
        assert err <= 1e-4, f"{model_type}: relative max error {err:.2e}"


def test_stock_transformers_loads_and_generates(gathered, tmp_path):
    """A fresh interpreter that never imports hf_moekd loads every output with a stock Auto class, gets the MoE's
    outputs and generates (causal LMs; base models give their hidden states)."""
    refs = {str(f): (ref, exact, _auto(t)) for t, (f, ref, exact) in gathered.items()}
    torch.save({"ids": IDS, "refs": refs}, tmp_path / "refs.pt")
    script = textwrap.dedent(f"""
        import sys, torch, transformers
        data = torch.load({str(tmp_path / "refs.pt")!r})
        for path, (ref, exact, auto) in data["refs"].items():
            model = getattr(transformers, auto).from_pretrained(path).eval()
            with torch.no_grad():
                out = model(input_ids=data["ids"])
                out = out.logits if auto == "AutoModelForCausalLM" else out.last_hidden_state
                err = ((out - ref).abs().max() / ref.abs().max()).item()
                assert not exact or err <= 1e-4, (path, err)
                if auto == "AutoModelForCausalLM":
                    new = model.generate(data["ids"], max_new_tokens=3, do_sample=False)
                    assert new.shape == (2, data["ids"].shape[1] + 3), (path, new.shape)
            print(type(model).__name__, f"{{err:.1e}}")
        assert "hf_moekd" not in sys.modules
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(res.stdout.splitlines()) == len(gathered)


# every strategy on one family of each expert layout; svd + align (all experts held) and top_kg on every family
LAYOUT_FAMILIES = ("gpt_oss", "deepseek_v3", "qwen2_moe", "nemotron_h")  # interleaved+bias+transposed; configured
STRATEGIES = sorted(set(MERGE_STRATEGIES) - {"topk"})  # with shared experts; twin with a shared-expert gate; no gate


@pytest.mark.parametrize("model_type", LM_FAMILIES)
def test_every_strategy_runs_with_calibration(model_type):
    """Distinct experts, calibration data: the strategies gather a model that runs (router statistics read from the
    family's own routing)."""
    moe = tiny_moe_lm(model_type, seed=3, identical=False)
    runs = [(s, {"top_k": 1} if s == "top_experts" else {}) for s in STRATEGIES] if model_type in LAYOUT_FAMILIES else []
    for strategy, options in [*runs, ("svd", {"align": True}), ("top_kg", {})]:
        dense = gather_experts(moe, strategy, calibration_dataset=[IDS], progress=False, **options)
        with torch.no_grad():
            assert torch.isfinite(_output(dense, IDS)).all(), strategy


def test_every_moe_family_of_transformers_has_an_entry():
    """Each MoE model_type that transformers registers with an Auto model class (causal LMs, seq2seq, and the base
    models of multimodal text towers and encoders) is in the registry: gathered, or refused with a reason."""
    from transformers.models.auto import modeling_auto as auto

    with_model = {*auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, *auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
                  *auto.MODEL_MAPPING_NAMES}
    moe_types = []
    for model_type, cls in tf.CONFIG_MAPPING.items():
        fields = {f.name for f in getattr(cls, "__dataclass_fields__", {}).values()}
        if fields & {*_EXPERT_FIELDS, "expert_capacity"} and model_type in with_model:
            moe_types.append(model_type)
    assert {"nllb-moe", "qwen3_vl_moe_text", "openai_privacy_filter"} <= set(moe_types)
    missing = sorted(set(moe_types) - set(FAMILIES))
    assert not missing, f"MoE families without a registry entry: {missing}"
    for family in FAMILIES.values():
        assert family.unsupported is None or len(family.unsupported) > 40  # a reason, not a placeholder


def test_unflagged_experts_layout_is_read_off_the_shapes():
    """Llama-4's experts module is not flagged by @use_experts_implementation: [E, H, 2I] / [E, I, H] is found from
    the shapes (here 2I == H, so only down_proj tells)."""
    for prefix, block in moe_blocks(tiny_moe_lm("llama4_text")).items():
        assert block.layout is not None and block.layout.transposed, prefix
    assert not any(b.layout.transposed for b in moe_blocks(tiny_moe_lm("mixtral")).values())


def test_router_rows_and_expert_weight_of_one_expert_models(tmp_path):
    """Gemma-4's per-expert scales (here 0.7, not the init's 1) go into the FFN and the kept expert's scale is 1;
    ZAYA's one expert gets 1/2 (expert vs skip class) and the skip class keeps its -1 bias."""
    for model_type, rows in (("gemma4_text", {"router.per_expert_scale": [1.0]}),
                             ("zaya", {"gate.balancing_biases": [0.0, -1.0]})):
        moe = tiny_moe_lm(model_type, zero_router=True)
        with torch.no_grad():
            for name, p in moe.named_parameters():
                if name.endswith("per_expert_scale"):
                    p.fill_(0.7)
            ref = moe(input_ids=IDS).logits
        moe.save_pretrained(tmp_path / model_type)
        dense = gather_experts(tmp_path / model_type, "weighted_average", calibration_dataset=[IDS], progress=False)
        with torch.no_grad():
            assert ((dense(input_ids=IDS).logits - ref).abs().max() / ref.abs().max()).item() <= 1e-4, model_type
        tensors = {**dict(dense.named_parameters()), **dict(dense.named_buffers())}
        for block in moe_blocks(dense):
            for rel, values in rows.items():
                assert tensors[f"{block}.{rel}"].tolist() == values, (model_type, block, rel)


# --------------------------------------------------------------------------- NLLB-MoE -> M2M100 (seq2seq)
def _tiny_nllb_moe(identical: bool):
    config = tf.NllbMoeConfig(vocab_size=96, d_model=32, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=48,
                              decoder_ffn_dim=48, encoder_attention_heads=4, decoder_attention_heads=4, num_experts=4,
                              encoder_sparse_step=2, decoder_sparse_step=2, expert_capacity=64,
                              max_position_embeddings=64)
    torch.manual_seed(0)
    model = tf.NllbMoeForConditionalGeneration(config).eval()
    if identical:
        with torch.no_grad():
            for prefix in moe_blocks(model):
                experts = model.get_submodule(prefix).experts
                for e in range(1, config.num_experts):
                    experts[f"expert_{e}"].load_state_dict(experts["expert_0"].state_dict())
    return model


def test_nllb_moe_becomes_m2m100(tmp_path):
    """Identical experts: the stock M2M100 (loaded in a fresh interpreter) has the MoE's logits; its sparse-layer
    tensors are renamed to M2M100's (ffn.fc1 -> fc1, cross_attention -> encoder_attn, ...) and it generates."""
    moe = _tiny_nllb_moe(identical=True)
    assert sorted(moe_blocks(moe)) == ["model.decoder.layers.1.ffn", "model.encoder.layers.1.ffn"]
    moe.save_pretrained(tmp_path / "moe", max_shard_size="100KB")
    gather_experts(tmp_path / "moe", "weighted_average", output_dir=tmp_path / "dense", progress=False,
                   return_model=False)
    inputs = {"input_ids": IDS, "decoder_input_ids": IDS[:, :5]}
    with torch.no_grad():
        ref = moe(**inputs).logits  # eval: every expert output times 1 - moe_token_dropout (0.2)
    result = fresh_process_logits(tmp_path / "dense", "AutoModelForSeq2SeqLM", inputs, tmp_path)
    assert result["class"] == "M2M100ForConditionalGeneration"
    assert ((result["logits"] - ref).abs().max() / ref.abs().max()).item() <= 1e-4
    dense = tf.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "dense")
    assert dense.generate(IDS, max_new_tokens=3, do_sample=False).shape[0] == 2


def test_nllb_moe_strategies_with_calibration():
    moe = _tiny_nllb_moe(identical=False)
    for strategy, options in (("weighted_average", {}), ("svd", {"align": True}), ("top_kg", {})):
        dense = gather_experts(moe, strategy, calibration_dataset=[IDS], progress=False, **options)
        assert type(dense).__name__ == "M2M100ForConditionalGeneration"
        with torch.no_grad():
            assert torch.isfinite(dense(input_ids=IDS, decoder_input_ids=IDS[:, :5]).logits).all(), strategy


# --------------------------------------------------------------------------- quantised checkpoints
def _save(model, folder, state, quantization_config):
    from safetensors.torch import save_file

    model.config.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": quantization_config}))
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))


def test_fp8_block_scaled_checkpoint_is_dequantised_on_read(tmp_path):
    """DeepSeek-style FP8 (as in the GLM-4.5 FP8 release): every projection stored as float8_e4m3fn +
    weight_scale_inv (128 x 128 blocks)."""
    from hf_moekd.ones.quantized import dequantize_fp8

    moe = tiny_moe_lm("glm4_moe")  # renormalised top-k: exact without calibration
    plain = tmp_path / "plain"
    moe.save_pretrained(plain)
    from safetensors.torch import load_file

    state, reference = {}, {}
    for name, t in load_file(str(plain / "model.safetensors")).items():
        if t.dim() == 2 and "proj" in name:
            scale = t.abs().amax().clamp(min=1e-12) / 448.0
            q = (t / scale).to(torch.float8_e4m3fn)
            state[name], state[f"{name}_scale_inv"] = q, scale.reshape(1, 1)
            reference[name] = dequantize_fp8(q, scale.reshape(1, 1)).float()
        else:  # the rest in bf16, as in published FP8 checkpoints
            state[name] = t.to(torch.bfloat16)
            reference[name] = state[name].float()
    ckpt = tmp_path / "fp8"
    ckpt.mkdir()
    _save(moe, ckpt, state, {"quant_method": "fp8", "weight_block_size": [128, 128]})
    plain_ref = tmp_path / "dequantised"
    plain_ref.mkdir()
    _save(moe, plain_ref, reference, None)
    ref_moe = tf.AutoModelForCausalLM.from_pretrained(plain_ref).eval()
    dense = gather_experts(ckpt, "weighted_average", output_dir=tmp_path / "dense", progress=False)
    assert "quantization_config" not in json.loads((tmp_path / "dense" / "config.json").read_text())
    with torch.no_grad():
        ref, out = ref_moe(input_ids=IDS).logits, dense.float()(input_ids=IDS).logits
    assert ((out - ref).abs().max() / ref.abs().max()).item() <= 1e-4


def test_mxfp4_experts_are_dequantised_on_read(tmp_path):
    """GPT-OSS MXFP4: experts stored as *_blocks / *_scales, read through transformers' own dequantiser."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    moe = tiny_moe_lm("gpt_oss")
    gen = torch.Generator().manual_seed(0)
    state = dict(moe.state_dict())
    with torch.no_grad():
        for name in [n for n in state if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
            e, rows_in, cols = state[name].shape  # in-memory [E, in, out]; blocks are [E, out, in / 32, 16]
            blocks = torch.randint(0, 256, (1, cols, rows_in // 32, 16), generator=gen, dtype=torch.uint8).expand(e, -1, -1, -1)
            scales = torch.randint(120, 124, (1, cols, rows_in // 32), generator=gen, dtype=torch.uint8).expand(e, -1, -1)
            moe.get_parameter(name).copy_(convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16).float())
            del state[name]
            state[f"{name}_blocks"], state[f"{name}_scales"] = blocks, scales
    ckpt = tmp_path / "mxfp4"
    ckpt.mkdir()
    _save(moe, ckpt, state, {"quant_method": "mxfp4"})
    dense = gather_experts(ckpt, "weighted_average", output_dir=tmp_path / "dense", progress=False)
    with torch.no_grad():
        ref, out = moe(input_ids=IDS).logits, dense.float()(input_ids=IDS).logits
    assert ((out - ref).abs().max() / ref.abs().max()).item() <= 1e-4


def test_unknown_quantisation_is_refused_in_one_line(tmp_path):
    moe = tiny_moe_lm("qwen3_moe")
    moe.save_pretrained(tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    (tmp_path / "q" / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "awq"}}))
    with pytest.raises(ValueError, match="quantised with 'awq'.*unquantised checkpoint"):
        gather_experts(tmp_path / "q", output_dir=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
