"""Helpers shared by the test modules and the scripts they launch (transformers' `testing_utils` convention): the
benchmark data folder, tiny models and data, gradient checks, the example scripts and `hf-moekd` run in this process,
a fresh interpreter for remote-code checks. Fixtures are in conftest.py; test modules import helpers from here, never
from each other."""
from __future__ import annotations

import os
import runpy
import subprocess
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path

import datasets
import pytest
import torch
import transformers as tf
from transformers import BertConfig, BertForSequenceClassification, BertForTokenClassification, TrainerCallback

from hf_moekd.models.dense_vit import DenseViTConfig, DenseViTForImageClassification, DenseViTModel
from hf_moekd.models.vmoe import VMoEConfig, VMoEForImageClassification, VMoEModel

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"


# ---- the benchmark data (GLUE, CoNLL-2003) --------------------------------------------------------------------------
def benchmark_data_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """$HF_MOEKD_DATA_DIR, else shared/data beside the repo: the folder holding glue/ and conll2003/. When it is
    missing, the calling test skips, or fails in CI (CI=true), where every test must run."""
    path = Path(environ.get("HF_MOEKD_DATA_DIR", DEFAULT_DATA_DIR))
    missing = [name for name in ("glue", "conll2003") if not (path / name).is_dir()]
    if missing:
        message = (f"benchmark data not found: {path} has no {' or '.join(f'{m}/' for m in missing)}; set "
                   "HF_MOEKD_DATA_DIR to the folder holding glue/ and conll2003/")
        if environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{message} (CI=true: the tests that need it fail instead of skipping)", pytrace=False)
        pytest.skip(message)
    return path


# ---- tiny BERTs and random token datasets -------------------------------------------------------------------------
VOCAB = 64


def bert_config(hidden: int = 32, layers: int = 2, heads: int = 4, num_labels: int = 3, **kw) -> BertConfig:
    return BertConfig(
        vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=2 * hidden, max_position_embeddings=64, num_labels=num_labels,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kw,
    )


def tiny_bert(seed: int = 0, token: bool = False, **kw):
    torch.manual_seed(seed)
    cls = BertForTokenClassification if token else BertForSequenceClassification
    return cls(bert_config(**kw))


def tiny_dataset(n: int = 32, seq: int = 12, num_labels: int = 3, token: bool = False, seed: int = 0,
                 ragged: bool = False):
    """Random token ids; with `ragged`, lengths vary and short rows are padded (attention_mask 0)."""
    g = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    for _ in range(n):
        length = int(torch.randint(seq // 2, seq + 1, (1,), generator=g)) if ragged else seq
        ids = torch.randint(1, VOCAB, (length,), generator=g).tolist()
        pad = seq - length
        rows["input_ids"].append(ids + [0] * pad)
        rows["attention_mask"].append([1] * length + [0] * pad)
        if token:
            labels = torch.randint(0, num_labels, (length,), generator=g).tolist()
            rows["labels"].append(labels + [-100] * pad)
        else:
            rows["labels"].append(int(torch.randint(0, num_labels, (1,), generator=g)))
    return datasets.Dataset.from_dict(rows)


# ---- tiny DenseViT and V-MoE image models -----------------------------------------------------------------
TINY_VIT = dict(
    image_size=8, patch_size=2, num_channels=1, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
    intermediate_size=37, num_labels=10, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
)
TINY_VIT_MOE = dict(num_experts=4, num_experts_per_tok=2)


def tiny_config(moe: bool, **overrides) -> DenseViTConfig | VMoEConfig:
    return VMoEConfig(**{**TINY_VIT, **TINY_VIT_MOE, **overrides}) if moe else DenseViTConfig(**{**TINY_VIT, **overrides})


def tiny_model(moe: bool, base: bool = False, seed: int = 0, perturb: bool = False, **overrides):
    """A tiny model; `perturb` adds noise to every parameter (fresh models have zero biases and unit LayerNorms)."""
    cls = {(True, True): VMoEModel, (True, False): VMoEForImageClassification,
           (False, True): DenseViTModel, (False, False): DenseViTForImageClassification}[moe, base]
    torch.manual_seed(seed)
    model = cls(tiny_config(moe, **overrides)).eval()
    if perturb:
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.05 * torch.randn_like(param))
    return model


def pixels(batch_size: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch_size, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


# ---- tiny MoE language models ---------------------------------------------------------------------------------------
MOE_LM = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, num_experts_per_tok=2)
MOE_LM_EXPERTS = 4


def mixtral(seed: int = 0) -> tf.MixtralForCausalLM:
    torch.manual_seed(seed)
    config = tf.MixtralConfig(**MOE_LM, intermediate_size=16, num_local_experts=MOE_LM_EXPERTS)
    return tf.MixtralForCausalLM(config).eval()


# ---- gradients ------------------------------------------------------------------------------------------------------
class GradRecorder(TrainerCallback):
    """Copies the student's gradients right before each optimizer step."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        self.grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})


def assert_same_grads(a: dict, b: dict, rtol: float = 1e-5) -> None:
    assert a.keys() == b.keys() and a
    floor = 1e-3 * max(g.abs().max() for g in a.values())  # gradients that are 0 in exact arithmetic (e.g. key bias)
    for name in a:
        scale = a[name].abs().max().clamp_min(floor)
        assert (a[name] - b[name]).abs().max() / scale <= rtol, name


# ---- the example scripts and `hf-moekd`, in this process --------------------------------------------------------
SCRIPT_FAST = ["--max_train_samples", "16", "--max_eval_samples", "16", "--max_steps", "2",
               "--per_device_train_batch_size", "8", "--max_seq_length", "32", "--save_strategy", "no",
               "--disable_tqdm", "true", "--report_to", "none"]
CLI_FAST = ["--max_train_samples", "16", "--max_eval_samples", "16", "--max_steps", "2",
            "--per_device_train_batch_size", "8", "--max_seq_length", "32", "--save_strategy", "no",
            "--logging_steps", "1"]
# a tiny student for --student_config_overrides
TINY_BERT = "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64"


def run_script(name: str, *args: str, monkeypatch) -> int:
    """Exit code of `examples/NAME ARGS`, run in this process."""
    monkeypatch.setattr(sys, "argv", [name, *args])
    try:
        runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


def cli(*argv: str | Path) -> int:
    """Exit code of `hf-moekd ARGV`, run in this process."""
    from hf_moekd.cli import main

    try:
        main([str(a) for a in argv])
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


# ---- a fresh interpreter that never imports hf_moekd (stock transformers only) ---------------------------------
FRESH_PROCESS_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    import transformers
    model = getattr(transformers, sys.argv[1]).from_pretrained(sys.argv[2], trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(**torch.load("inputs.pt")).logits
    assert "hf_moekd" not in sys.modules, "hf_moekd was imported"
    torch.save({"logits": logits, "module": type(model).__module__, "class": type(model).__name__}, "out.pt")
    """
)


def fresh_process_logits(checkpoint: Path, auto_class: str, inputs: dict[str, torch.Tensor], workdir: Path) -> dict:
    """Logits, module and class name of `auto_class.from_pretrained(checkpoint, trust_remote_code=True)`."""
    torch.save(inputs, workdir / "inputs.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(workdir / "modules"), "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS_SCRIPT, auto_class, str(checkpoint)], cwd=workdir,
                          env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(workdir / "out.pt")


# ---- one tiny checkpoint of every MoE family (tests/test_families.py) ----------------------------------------------
TINY_MOE = dict(vocab_size=96, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                intermediate_size=96, moe_intermediate_size=32, head_dim=16, max_position_embeddings=64,
                num_experts=4, num_local_experts=4, n_routed_experts=4, moe_num_experts=4, num_experts_per_tok=2,
                moe_k=2, pad_token_id=0, bos_token_id=1, eos_token_id=2, first_k_dense_replace=1, n_group=1,
                topk_group=1, shared_expert_intermediate_size=48, moe_layer_start_index=1, n_shared_experts=1,
                attn_layer_period=1, attn_layer_offset=0, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
                qk_nope_head_dim=8, v_head_dim=16, index_head_dim=16, index_n_heads=2)
TINY_MOE_OVERRIDES: dict[str, dict] = {
    "beam": {"mlp_layer_types": ["dense", "sparse", "sparse"]},
    "zaya": {"num_experts_per_tok": 1},  # ZAYA supports top-1 only
    "lfm2_moe": {"layer_types": ["conv", "full_attention", "conv"], "num_dense_layers": 1},
    "granitemoehybrid": {"layer_types": ["linear_attention", "attention", "linear_attention"]},
    "glm4v_moe_text": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                           "mrope_section": [2, 1, 1]}},  # sections of the rotary half-dim (4)
    "mimo_v2_flash": {"num_key_value_heads": 2, "head_dim": 24,  # sliding layers double the KV heads; rotary dim
                      "v_head_dim": 16, "mlp_layer_types": ["dense", "sparse", "sparse"]},  # 0.334 x 24 = 8
    "gemma4_text": {"enable_moe_block": True, "top_k_experts": 2, "per_layer_config": {}, "vocab_size_per_layer_input": 96,
                    "hidden_size_per_layer_input": 16, "layer_types": ["sliding_attention", "sliding_attention",
                                                                       "full_attention"]},
    "dots3_note_text": {"per_layer_config": {}, "mlp_layer_types": ["dense", "sparse", "sparse"],
                        "layer_types": ["sliding_attention", "sliding_attention", "full_attention"]},
    "longcat_flash": {"num_layers": 2, "head_dim": 8, "ffn_hidden_size": 96, "expert_ffn_hidden_size": 32, "zero_expert_num": 2,
                      "moe_topk": 2},
    "qwen4_exp_text": {"layer_types": ["linear_attention", "linear_attention", "indexed_attention"],
                       "indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 8,
                       "indexer_compress_ratio": 1, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
                       "linear_num_key_heads": 2, "linear_num_value_heads": 4, "hc_lowrank": 8, "ple_embed_dim": 16,
                       "ngram_vocab_size_base": 200, "split_ngram_parts": 4, "make_ngram_vocab_size_divisible_by": 8},
    "llama4_text": {"intermediate_size": 32, "intermediate_size_mlp": 96, "num_experts_per_tok": 1,  # Llama-4: top-1
                    "moe_layers": [1, 2]},
    "glm5_next_text": {"qk_rope_head_dim": 0, "qk_nope_head_dim": 16,  # its DSA attention layers are NoPE
                       "mlp_layer_types": ["dense", "sparse", "sparse"],
                       "layer_types": ["linear_attention", "linear_attention", "indexed_attention"]},
}


def _with_attention(config) -> None:
    """Hybrid families (linear attention / Mamba + attention): make the last layer a full-attention one, so the tiny
    model has a KV cache to generate with."""
    kinds = getattr(config, "layer_types", None)
    if isinstance(kinds, list) and kinds and not any(k in ("full_attention", "attention") for k in kinds):
        default = type(config)().layer_types or []
        full = next((k for k in default if k in ("full_attention", "attention")), None)
        if full is not None:
            config.layer_types = [*kinds[:-1], full]


def tiny_moe_config(model_type: str):
    """The tiny config of `model_type` that `tiny_moe_lm` builds."""
    import dataclasses

    cls = tf.CONFIG_MAPPING[model_type]
    names = {f.name for f in dataclasses.fields(cls)}
    config = cls(**{k: v for k, v in {**TINY_MOE, **TINY_MOE_OVERRIDES.get(model_type, {})}.items() if k in names})
    _with_attention(config)
    return config


def tiny_moe_lm(model_type: str, seed: int = 0, identical: bool = True, zero_router: bool = False):
    """A tiny random MoE language model of `model_type` (experts all equal to expert 0 when `identical`; router,
    router biases and shared-expert gates zero when `zero_router`: every token then gets the same routing weights)."""
    from hf_moekd.model_utils.moe_layout import moe_blocks
    from hf_moekd.ones.families.targets import model_class

    config = tiny_moe_config(model_type)
    torch.manual_seed(seed)
    model = model_class(config, None, "AutoModelForCausalLM")(config).eval()
    with torch.no_grad():
        for prefix in moe_blocks(model):
            block = model.get_submodule(prefix)
            if identical:
                for p in block.experts.parameters(recurse=False):
                    p.copy_(p[0:1].expand_as(p))
            if zero_router:
                whole_layer = hasattr(block, "self_attn")  # Gemma-4: experts and router sit in the decoder layer
                for n, p in [*block.named_parameters(), *block.named_buffers()]:
                    if whole_layer and not (n.startswith("router.") and p.dim() == 2):
                        continue
                    if not n.startswith(("experts.", "shared_expert.", "shared_experts.", "shared_mlp.")) and p.is_floating_point():
                        p.zero_()
    return model
