"""OneS knowledge gathering (hf_moekd.ones): exactness per family, streaming, alignment, errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from contextlib import nullcontext

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file
from testing_utils import MOE_LM, MOE_LM_EXPERTS, mixtral

from hf_moekd.ones import ExpertWeights, gather_experts, merge_experts
from hf_moekd.ones.strategies import default_svd_rank
from hf_moekd.ones import gather as gather_mod
from hf_moekd.ones.cli import add_gather_parser

COMMON, EXPERTS = MOE_LM, MOE_LM_EXPERTS
VOCAB, HIDDEN, LAYERS = MOE_LM["vocab_size"], MOE_LM["hidden_size"], MOE_LM["num_hidden_layers"]


def qwen2_moe(seed=0):
    """Layer 1 is a plain MLP wider than layer 0's experts + shared expert (tests zero-padding)."""
    torch.manual_seed(seed)
    cfg = tf.Qwen2MoeConfig(**COMMON, intermediate_size=24, moe_intermediate_size=8, shared_expert_intermediate_size=12,
                            num_experts=EXPERTS, norm_topk_prob=True, mlp_only_layers=[1])
    model = tf.Qwen2MoeForCausalLM(cfg).eval()
    with torch.no_grad():  # sigmoid(0) = 0.5 for every token: the shared-expert fold is exact
        model.model.layers[0].mlp.shared_expert_gate.weight.zero_()
    return model


def qwen3_moe(seed=0):
    torch.manual_seed(seed)
    cfg = tf.Qwen3MoeConfig(**COMMON, intermediate_size=24, moe_intermediate_size=16, num_experts=EXPERTS,
                            norm_topk_prob=True, head_dim=16)  # head_dim != hidden/heads: must be carried over
    return tf.Qwen3MoeForCausalLM(cfg).eval()


def switch(seed=0):
    """Layer 1 of encoder and decoder is sparse; zero router => p = 1/E for every token (scale fixed by calibration)."""
    torch.manual_seed(seed)
    cfg = tf.SwitchTransformersConfig(vocab_size=VOCAB, d_model=HIDDEN, d_kv=8, d_ff=16, num_layers=LAYERS,
                                      num_decoder_layers=LAYERS, num_heads=4, num_experts=EXPERTS,
                                      num_sparse_encoder_layers=1, num_sparse_decoder_layers=1,
                                      expert_capacity=1000, dropout_rate=0.0, router_jitter_noise=0.0)
    model = tf.SwitchTransformersForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "router.classifier" in n:
                p.zero_()
    return model


FAMILIES = {"mixtral": mixtral, "qwen2_moe": qwen2_moe, "qwen3_moe": qwen3_moe, "switch": switch}
IDS = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))


def make_identical(model):
    """Copy expert 0 into every expert of every sparse block."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                p.copy_(p[0:1].expand_as(p))
        for name, mod in model.named_modules():
            if name.endswith(".experts") and hasattr(mod, "expert_0"):
                for e in range(1, EXPERTS):
                    mod[f"expert_{e}"].load_state_dict(mod["expert_0"].state_dict())
    return model


def logits(model, ids=IDS):
    with torch.no_grad():
        kw = {"decoder_input_ids": ids} if model.config.is_encoder_decoder else {}
        return model(input_ids=ids, **kw).logits


def calibration(family):
    return [IDS] if family == "switch" else None  # Switch's top-1 prob scale is measured on calibration tokens


# --------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("strategy", ["average", "weighted_average", "top_experts"])
def test_identical_experts_are_exact(family, strategy):
    moe = make_identical(FAMILIES[family]())
    with pytest.warns(UserWarning) if strategy == "top_experts" and family != "switch" else nullcontext():
        dense = gather_experts(moe, strategy, calibration_dataset=calibration(family), progress=False)
    assert "Moe" not in type(dense).__name__ and "Switch" not in type(dense).__name__
    torch.testing.assert_close(logits(dense), logits(moe), atol=1e-5, rtol=0)


def test_stock_transformers_loads_outputs(tmp_path):
    """Outputs load with stock Auto classes in a fresh interpreter that never imports hf_moekd."""
    refs = {}
    for family, build in FAMILIES.items():
        moe = make_identical(build())
        out = tmp_path / family
        gather_experts(moe, "weighted_average", calibration_dataset=calibration(family), output_dir=out, progress=False,
                       return_model=False)
        refs[str(out)] = (moe.config.is_encoder_decoder, logits(moe))
    torch.save({"ids": IDS, "refs": refs}, tmp_path / "refs.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
        data = torch.load({str(tmp_path / "refs.pt")!r})
        for path, (seq2seq, ref) in data["refs"].items():
            cls = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
            model = cls.from_pretrained(path).eval()
            kw = {{"decoder_input_ids": data["ids"]}} if seq2seq else {{}}
            with torch.no_grad():
                out = model(input_ids=data["ids"], **kw).logits
            err = (out - ref).abs().max().item()
            assert err < 1e-5, (path, type(model).__name__, err)
            print(type(model).__name__, err)
        assert "hf_moekd" not in sys.modules
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    for name in ("MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "T5ForConditionalGeneration"):
        assert name in res.stdout


# --------------------------------------------------------------------------- streaming
@pytest.mark.parametrize("family,original_format", [("mixtral", True), ("mixtral", False), ("qwen2_moe", True), ("switch", True)])
def test_streaming_equals_in_memory(tmp_path, family, original_format):
    moe = FAMILIES[family](seed=3)  # distinct experts
    ckpt = tmp_path / "moe"
    moe.save_pretrained(ckpt, max_shard_size="20KB", save_original_format=original_format)
    assert (ckpt / "model.safetensors.index.json").is_file()
    keys = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    if family == "mixtral":  # both on-disk layouts really are exercised
        assert any(".block_sparse_moe.experts.0.w1." in k for k in keys) == original_format
    opts = dict(strategy="svd", rank=4, calibration_dataset=[IDS], progress=False)
    ref = gather_experts(moe, **opts)
    out = gather_experts(ckpt, output_dir=tmp_path / "dense", max_shard_size="16KB", **opts)
    assert (tmp_path / "dense" / "model.safetensors.index.json").is_file()  # output written in several shards
    a, b = ref.state_dict(), out.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=k)


def test_calibration_usage_matches_router(tmp_path):
    moe = mixtral()
    stats = gather_mod.collect_routing_stats(moe, gather_mod.get_family("mixtral"), ["model.layers.0.mlp"], [IDS])
    st = stats["model.layers.0.mlp"]
    out = moe(IDS, output_router_logits=True)
    idx = out.router_logits[0].softmax(-1).topk(2, -1).indices
    assert st.tokens == IDS.numel()
    torch.testing.assert_close(st.counts.float(), torch.bincount(idx.flatten(), minlength=EXPERTS).float())
    assert abs(st.routed_mass / st.tokens - 1.0) < 1e-6  # Mixtral renormalises its top-2 weights


def test_calibration_dataset_respects_attention_mask():
    import datasets

    rows = {"input_ids": [[5, 6, 7, 8], [9, 10, 0, 0]], "attention_mask": [[1, 1, 1, 1], [1, 1, 0, 0]], "text": ["a", "b"]}
    stats = gather_mod.collect_routing_stats(mixtral(), gather_mod.get_family("mixtral"), ["model.layers.1.mlp"],
                                             datasets.Dataset.from_dict(rows))
    st = stats["model.layers.1.mlp"]
    assert st.tokens == 6 and st.counts.sum() == 12  # padded tokens left out; top-2 per token


# --------------------------------------------------------------------------- strategies
def _experts(seed=0, e=EXPERTS, i=24, h=16, noise=0.0, gated=True, bias=False):
    """Experts that are noisy copies of one FFN (upcycled-like); plain FFNs may carry biases."""
    g = torch.Generator().manual_seed(seed)
    like = lambda *shape: torch.randn(1, *shape, generator=g).repeat(e, *[1] * len(shape)) + noise * torch.randn(e, *shape, generator=g)  # noqa: E731
    ins = [like(i, h) for _ in range(2 if gated else 1)]
    return ExpertWeights(ins, like(h, i), [like(i) for _ in ins] if bias else None, like(h) if bias else None)


def _ffn(w, e, x):
    if len(w.in_proj) == 2:
        hid = torch.nn.functional.silu(x @ w.in_proj[0][e].T) * (x @ w.in_proj[1][e].T)
    else:
        hid = torch.relu(x @ w.in_proj[0][e].T + w.in_bias[0][e])
    return hid @ w.out_proj[e].T + (0 if w.out_bias is None else w.out_bias[e])


@pytest.mark.parametrize("gated,bias", [(True, False), (False, True)])
def test_alignment_recovers_permuted_average(gated, bias):
    ex = _experts(noise=0.05, gated=gated, bias=bias)
    ref = merge_experts(ex, "average")
    g = torch.Generator().manual_seed(5)
    perms = torch.stack([torch.arange(24)] + [torch.randperm(24, generator=g) for _ in range(EXPERTS - 1)])
    shuffled = ex.permute_units(perms)
    x = torch.randn(7, 16)
    torch.testing.assert_close(_ffn(shuffled, 2, x), _ffn(ex, 2, x))  # permuting units keeps each expert's function
    assert (merge_experts(shuffled, "average").out_proj - ref.out_proj).abs().max() > 0.1
    aligned = merge_experts(shuffled, "average", align=True)
    for a, b in zip(aligned.in_proj + [aligned.out_proj] + (aligned.in_bias or []), ref.in_proj + [ref.out_proj] + (ref.in_bias or [])):
        torch.testing.assert_close(a, b)


def test_top_experts_uses_router_frequency_and_topk_is_its_deprecated_name():
    ex = _experts(noise=1.0)
    usage = torch.tensor([0.1, 0.5, 0.05, 0.35])
    out = merge_experts(ex, "top_experts", usage=usage, k=2)
    torch.testing.assert_close(out.out_proj, (0.5 * ex.out_proj[1] + 0.35 * ex.out_proj[3]) / 0.85)
    with pytest.warns(FutureWarning, match="renamed `top_experts`"):
        old = merge_experts(ex, "topk", usage=usage, k=2)
    torch.testing.assert_close(old.out_proj, out.out_proj)


def test_svd_default_truncates_each_expert_and_full_rank_is_the_weighted_average():
    """Issue 16 item 6: `svd` at its default is not averaging for distinct experts; r = min(I, H) // E."""
    ex = _experts(noise=1.0)  # 4 distinct experts, 24x16 matrices: default rank 16 // 4 = 4
    usage = torch.tensor([0.1, 0.5, 0.05, 0.35])
    assert default_svd_rank(ex) == 4
    default = merge_experts(ex, "svd", usage=usage)
    weighted = merge_experts(ex, "weighted_average", usage=usage)
    torch.testing.assert_close(weighted.out_proj, sum(w * m for w, m in zip(usage, ex.out_proj)))
    assert (default.out_proj - weighted.out_proj).norm() > 0.05 * weighted.out_proj.norm()
    torch.testing.assert_close(default.out_proj, merge_experts(ex, "svd", usage=usage, rank=4).out_proj)
    full = merge_experts(ex, "svd", usage=usage, rank=16)
    for a, b in zip(full.in_proj + [full.out_proj], weighted.in_proj + [weighted.out_proj]):
        assert torch.equal(a, b)
    assert torch.linalg.matrix_rank(default.out_proj) <= 4 * EXPERTS


@pytest.mark.parametrize("method", ["expert", "joint", "merged"])
def test_svd_low_rank_identical_experts_exact(method):
    g = torch.Generator().manual_seed(0)
    low = lambda m, n: torch.randn(m, 3, generator=g) @ torch.randn(3, n, generator=g)  # noqa: E731  rank 3
    ex = ExpertWeights([low(64, 32).expand(EXPERTS, 64, 32), low(64, 32).expand(EXPERTS, 64, 32)],
                       low(32, 64).expand(EXPERTS, 32, 64))
    for lowrank in (False, True):
        out = merge_experts(ex, "svd", rank=3, method=method, lowrank=lowrank)
        torch.testing.assert_close(out.out_proj, ex.out_proj[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out.in_proj[1], ex.in_proj[1][0], atol=1e-4, rtol=1e-4)


def test_svd_lowrank_settings(monkeypatch):
    """Randomized SVD: q = rank + 16 directions and 2 power iterations by default (benchmarks/gather_memory.py),
    both options; one matmul joins the experts' factors, as the per-expert sum does."""
    calls = []
    real = torch.svd_lowrank
    monkeypatch.setattr(torch, "svd_lowrank", lambda m, q, niter: calls.append((q, niter)) or real(m, q=q, niter=niter))
    ex = _experts(noise=1.0, i=64, h=48)
    merge_experts(ex, "svd", rank=2, lowrank=True)
    assert set(calls) == {(18, 2)} and len(calls) == 3 * EXPERTS
    calls.clear()
    merge_experts(ex, "svd", rank=2, lowrank=True, lowrank_oversample=4, lowrank_niter=5)
    assert set(calls) == {(6, 5)}
    exact = merge_experts(ex, "svd", rank=3, lowrank=False)
    w = torch.full((EXPERTS,), 1 / EXPERTS)
    parts = []
    for e in range(EXPERTS):
        u, sv, vh = torch.linalg.svd(ex.out_proj[e], full_matrices=False)
        parts.append(w[e] * (u[:, :3] * sv[:3]) @ vh[:3])
    torch.testing.assert_close(exact.out_proj, sum(parts), atol=1e-5, rtol=1e-5)


def test_svd_rank_errors():
    ex = _experts()
    with pytest.raises(ValueError, match=r"24x16.*rank <= 16"):
        merge_experts(ex, "svd", rank=17)
    with pytest.raises(ValueError, match="rank 0"):
        merge_experts(ex, "svd", rank=0)
    with pytest.raises(ValueError, match="does not take option"):
        gather_experts(mixtral(), "average", rank=4, progress=False)
    with pytest.raises(ValueError, match="rank <= 16"):
        gather_experts(mixtral(), "svd", rank=17, progress=False)


# --------------------------------------------------------------------------- errors
def test_unsupported_architectures():
    llama = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=16,
                                               num_hidden_layers=1, num_attention_heads=4))
    with pytest.raises(ValueError, match=r"model_type 'llama'.*supported.*mixtral"):
        gather_experts(llama, "average", progress=False)
    with pytest.raises(ValueError, match="cannot gather 'jetmoe'.*mixture of attention heads"):
        gather_mod.get_family("jetmoe")


def test_interrupted_gathering_leaves_no_output(tmp_path, monkeypatch):
    moe = mixtral()
    ckpt = tmp_path / "moe"
    moe.save_pretrained(ckpt, max_shard_size="20KB")
    real, calls = gather_mod._gather_block, []

    def flaky(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        return real(*a, **kw)

    monkeypatch.setattr(gather_mod, "_gather_block", flaky)
    with pytest.raises(RuntimeError, match="simulated crash"):
        gather_experts(ckpt, "average", output_dir=tmp_path / "out", max_shard_size="16KB", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe"]  # neither output nor temporary directory


def test_bin_checkpoint_refused_unless_allowed(tmp_path):
    model = mixtral()
    model.config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match=r"only pickle weights.*safetensors.*allow_pickle=True"):
        gather_experts(tmp_path, "average", progress=False)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # the user trusts this file
    dense = gather_experts(tmp_path, "average", progress=False, allow_pickle=True)
    expected = gather_experts(model, "average", progress=False)
    for name, tensor in expected.state_dict().items():
        torch.testing.assert_close(dense.state_dict()[name], tensor, rtol=0, atol=0)


def test_truncated_shard_and_missing_expert(tmp_path):
    ckpt = tmp_path / "moe"
    mixtral().save_pretrained(ckpt, max_shard_size="20KB")
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    key = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    shard = ckpt / index["weight_map"][key]
    tensors = load_file(shard)
    del tensors[key]
    save_file(tensors, shard, metadata={"format": "pt"})
    del index["weight_map"][key]
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"missing expert tensor\(s\) model\.layers\.1\.mlp\.experts\.3\.w2\.weight"):
        gather_experts(ckpt, "average", progress=False)
    other = ckpt / index["weight_map"]["model.layers.0.block_sparse_moe.experts.0.w1.weight"]
    other.write_bytes(other.read_bytes()[:100])
    with pytest.raises(OSError, match=f"{other.name}.*truncated or corrupt"):
        gather_experts(ckpt, "average", progress=False)


def test_cli_gather(tmp_path):
    import argparse

    ckpt = tmp_path / "moe"
    make_identical(mixtral()).save_pretrained(ckpt)
    torch.save([IDS], tmp_path / "calib.pt")
    parser = argparse.ArgumentParser()
    add_gather_parser(parser.add_subparsers(dest="command"))
    ns = parser.parse_args(["gather", str(ckpt), str(tmp_path / "dense"), "--strategy", "top_experts", "--top_k", "1",
                            "--calibration_dataset", str(tmp_path / "calib.pt")])
    ns.func(ns)
    dense = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert type(dense).__name__ == "MistralForCausalLM"
    torch.testing.assert_close(logits(dense), logits(tf.AutoModelForCausalLM.from_pretrained(ckpt)), atol=1e-5, rtol=0)
