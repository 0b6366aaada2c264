"""DenseViT and V-MoE image models: routing, balancing loss, V-MoE -> DenseViT exactness, (de)serialisation,
Auto/remote-code loading (and the legacy model_type "ones"), attention kernels, checkpointing, distillation with
DistillationTrainer."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from testing_utils import fresh_process_logits, pixels, tiny_config, tiny_model
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from hf_moekd.model_utils.capture import capture_qkv, find_blocks, qkv_modules
from hf_moekd.models.dense_vit import DenseViTConfig, DenseViTForImageClassification, DenseViTModel
from hf_moekd.models.dense_vit import register as register_dense_vit
from hf_moekd.models.vmoe import (
    VMoEModel,
    load_balancing_loss,
    top_k_routing,
    vmoe_expert_weights,
)
from hf_moekd.models.vmoe import register as register_vmoe
from hf_moekd.ones.vit import dense_vit_config, dense_vit_from_vmoe_nonexpert

SEQ = 17  # 16 patches + CLS
LABELS = torch.tensor([0, 4, 9])
BOTH = pytest.mark.parametrize("moe", [False, True], ids=["dense_vit", "vmoe"])


# ---- forward / backward ------------------------------------------------------------------------------

@BOTH
def test_forward_backward_shapes(moe):
    model = tiny_model(moe).train()
    out = model(pixels(), labels=LABELS, output_hidden_states=True, output_attentions=True)
    assert out.logits.shape == (3, 10) and torch.isfinite(out.loss)
    assert len(out.hidden_states) == 5 and all(h.shape == (3, SEQ, 32) for h in out.hidden_states)
    assert len(out.attentions) == 4 and out.attentions[0].shape == (3, 4, SEQ, SEQ)
    if moe:
        assert len(out.router_logits) == 2 and out.router_logits[0].shape == (3, SEQ, 4) and out.aux_loss.ndim == 0
        layers = model.vmoe.encoder.layer
        assert [layer.is_moe for layer in layers] == [False, True, False, True]
        assert tuple(layers[1].mlp.experts.w_in.shape) == (4, 37, 32) and hasattr(layers[0].mlp, "fc1")
        assert tuple(layers[1].mlp.experts.w_out.shape) == (4, 32, 37) and layers[1].mlp.router.gate.bias is None
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    if moe:
        assert model.vmoe.encoder.layer[1].mlp.router.gate.weight.grad.abs().sum() > 0
    tuple_logits = model.eval()(pixels(), return_dict=False)[0]
    torch.testing.assert_close(tuple_logits, model(pixels()).logits)
    with pytest.raises(ValueError, match=r"pixel_values must be \[batch, 1, 8, 8\]"):
        model(torch.rand(2, 3, 8, 8))


def test_moe_layer_placement():
    assert tiny_config(True).moe_layers == [1, 3]
    assert tiny_config(True, moe_layer_frequency=1).moe_layers == [0, 1, 2, 3]
    assert tiny_config(True, moe_layer_frequency=3, num_hidden_layers=6).moe_layers == [2, 5]


def test_regression_head_uses_mse():
    for moe in (False, True):
        model = tiny_model(moe, num_labels=1)
        targets = torch.tensor([0.5, -1.0, 2.0])
        with torch.no_grad():
            out = model(pixels(), labels=targets)
        expected = F.mse_loss(out.logits.squeeze(-1), targets) + (0.01 * out.aux_loss if moe else 0.0)
        assert out.loss.item() == pytest.approx(expected.item(), abs=1e-6)


# ---- routing -----------------------------------------------------------------------------------------

def test_exactly_top_k_experts_per_token_and_weights():
    model = tiny_model(True, base=True, perturb=True)
    mlp = model.encoder.layer[1].mlp
    log = []
    original = mlp.experts.expert_forward
    mlp.experts.expert_forward = lambda e, h: (log.append((e, h.shape[0])), original(e, h))[1]
    hidden = torch.randn(2, 6, 32)
    output, logits = mlp(hidden)
    weights, experts = top_k_routing(logits, 2)
    assert sorted(e for e, _ in log) == [0, 1, 2, 3]  # each expert called once, on its own token group
    rows = dict(log)
    assert sum(rows.values()) == 12 * 2  # every token evaluated by exactly k = 2 experts
    assert rows == {e: int((experts == e).sum()) for e in range(4)}
    assert (experts[..., 0] != experts[..., 1]).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 6))  # renormalised
    probs = logits.softmax(-1)
    for b, t in [(0, 0), (0, 5), (1, 3)]:
        e = probs[b, t].topk(2).indices
        expected = sum(
            probs[b, t, j] / probs[b, t, e].sum() * original(int(j), hidden[b, t : t + 1])[0] for j in e
        )
        torch.testing.assert_close(output[b, t], expected)
    raw, _ = top_k_routing(logits, 2, normalize=False)
    assert (raw.sum(-1) < 1).all()
    torch.testing.assert_close(raw, probs.topk(2).values)


def test_load_balancing_loss_hand_computed():
    # 3 experts, top-2, 4 tokens with known routing.
    logits = torch.tensor([[[2.0, 1.0, 0.0], [0.0, 1.0, 2.0], [2.0, 0.0, 1.0], [1.0, 2.0, 0.0]]])
    p = [math.exp(2) / (math.exp(2) + math.e + 1), math.e / (math.exp(2) + math.e + 1), 1 / (math.exp(2) + math.e + 1)]
    # token probabilities for experts (0, 1, 2): t0 (p0, p1, p2), t1 (p2, p1, p0), t2 (p0, p2, p1), t3 (p1, p0, p2)
    mean_prob = [(p[0] + p[2] + p[0] + p[1]) / 4, (p[1] + p[1] + p[2] + p[0]) / 4, (p[2] + p[0] + p[1] + p[2]) / 4]
    # top-2: t0 {0, 1}, t1 {1, 2}, t2 {0, 2}, t3 {0, 1}
    fraction = [3 / 4, 3 / 4, 2 / 4]
    expected = 3 * sum(f * m for f, m in zip(fraction, mean_prob))
    assert load_balancing_loss([logits], top_k=2).item() == pytest.approx(expected, abs=1e-6)
    uniform = torch.zeros(1, 4, 3)  # uniform probabilities: E * k * (1/E) = k whatever the tie-breaking
    assert load_balancing_loss([logits, uniform], top_k=2).item() == pytest.approx((expected + 2) / 2, abs=1e-6)
    collapsed = torch.tensor([[[9e3, 9e3, 0.0]] * 4])  # all tokens to experts {0, 1} with probability 1/2 each
    assert load_balancing_loss([collapsed], top_k=2).item() == pytest.approx(3.0, abs=1e-6)


def test_model_aux_loss_and_head_loss():
    model = tiny_model(True, perturb=True)
    out = model(pixels())
    torch.testing.assert_close(out.aux_loss, load_balancing_loss(out.router_logits, 2))
    for i in model.config.moe_layers:  # zero gates: uniform probabilities -> loss exactly k = 2 per block
        model.vmoe.encoder.layer[i].mlp.router.gate.weight.data.zero_()
    out = model(pixels(), labels=LABELS)
    assert out.aux_loss.item() == pytest.approx(2.0)
    assert out.loss.item() == pytest.approx(F.cross_entropy(out.logits, LABELS).item() + 0.01 * 2.0, abs=1e-6)


def test_router_jitter_only_in_training():
    model = tiny_model(True, base=True, router_jitter=0.5)
    a, b = model(pixels()), model(pixels())
    torch.testing.assert_close(a.router_logits[0], b.router_logits[0], rtol=0, atol=0)
    model.train()
    assert not torch.equal(model(pixels()).router_logits[0], model(pixels()).router_logits[0])


# ---- V-MoE -> DenseViT twin ------------------------------------------------------------------------------

def _set_identical_experts_and_gather(vmoe, dense, pending) -> None:
    with torch.no_grad():
        for block, mlp in pending:
            experts = vmoe.base_model.encoder.layer[block].mlp.experts
            for name in ("w_in", "b_in", "w_out", "b_out"):
                param = getattr(experts, name)
                param.copy_(param[:1].expand_as(param))
            weights = vmoe_expert_weights(vmoe, block)
            mlp.fc1.weight.copy_(weights["w_in"][0])
            mlp.fc1.bias.copy_(weights["b_in"][0])
            mlp.fc2.weight.copy_(weights["w_out"][0])
            mlp.fc2.bias.copy_(weights["b_out"][0])


@pytest.mark.parametrize("base", [False, True], ids=["classifier", "base"])
def test_identical_experts_equal_dense_vit_twin(base):
    vmoe = tiny_model(True, base=base, perturb=True)
    dense, pending = dense_vit_from_vmoe_nonexpert(vmoe)
    assert type(dense) is (DenseViTModel if base else DenseViTForImageClassification) and not dense.training
    assert [b for b, _ in pending] == [1, 3]
    assert all(mlp is dense.base_model.encoder.layer[b].mlp for b, mlp in pending)
    # Every non-expert weight copied exactly.
    source = {k.replace("vmoe.", "dense_vit.", 1): v for k, v in vmoe.state_dict().items()}
    for name, value in dense.state_dict().items():
        if ".layer.1.mlp." not in name and ".layer.3.mlp." not in name:
            assert torch.equal(value, source[name]), name
    _set_identical_experts_and_gather(vmoe, dense, pending)
    inputs = pixels(4)
    v_out, o_out = vmoe(inputs, output_hidden_states=True), dense(inputs, output_hidden_states=True)
    key = "last_hidden_state" if base else "logits"
    torch.testing.assert_close(v_out[key], o_out[key], rtol=1e-5, atol=1e-5)
    for hv, ho in zip(v_out.hidden_states, o_out.hidden_states):
        torch.testing.assert_close(hv, ho, rtol=1e-5, atol=1e-5)
    # Without renormalisation the expert output is scaled by the sum of the top-k probabilities: no longer equal.
    for block in vmoe.config.moe_layers:
        vmoe.base_model.encoder.layer[block].mlp.normalize = False
    assert (vmoe(inputs)[key] - o_out[key]).abs().max() > 1e-3


def test_dense_config_and_expert_weights():
    config = tiny_config(True, hidden_act="gelu_new", layer_norm_eps=1e-6, qkv_bias=False,
                         id2label={i: f"digit{i}" for i in range(10)})
    dense = dense_vit_config(config)
    assert type(dense) is DenseViTConfig and dense.model_type == "dense_vit"
    for name in ("image_size", "patch_size", "num_channels", "hidden_size", "num_hidden_layers",
                 "num_attention_heads", "intermediate_size", "hidden_act", "layer_norm_eps", "qkv_bias",
                 "hidden_dropout_prob", "attention_probs_dropout_prob", "initializer_range"):
        assert getattr(dense, name) == getattr(config, name), name
    assert dense.id2label == config.id2label and dense.label2id == config.label2id and dense.num_labels == 10
    assert not any(hasattr(dense, name) for name in ("num_experts", "router_aux_loss_coef", "moe_layer_frequency"))
    model = tiny_model(True)
    weights = vmoe_expert_weights(model, 3)
    experts = model.vmoe.encoder.layer[3].mlp.experts
    assert {k: tuple(v.shape) for k, v in weights.items()} == {
        "w_in": (4, 37, 32), "b_in": (4, 37), "w_out": (4, 32, 37), "b_out": (4, 32)}
    assert weights["w_in"].data_ptr() == experts.w_in.data_ptr() and not weights["w_in"].requires_grad
    with pytest.raises(ValueError, match=r"Block 0 is not an MoE block; the MoE blocks are \[1, 3\]"):
        vmoe_expert_weights(model, 0)
    with pytest.raises(TypeError, match="Expected VMoEModel"):
        dense_vit_from_vmoe_nonexpert(tiny_model(False))


# ---- attention kernels, checkpointing, capture hooks ------------------------------------------------------

@BOTH
def test_sdpa_matches_eager(moe):
    model = tiny_model(moe, perturb=True)
    assert model.config._attn_implementation == "sdpa"
    sdpa = model(pixels(), output_hidden_states=True)
    model.set_attn_implementation("eager")
    eager = model(pixels(), output_hidden_states=True)
    for s, e in zip(sdpa.hidden_states, eager.hidden_states):
        torch.testing.assert_close(s, e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sdpa.logits, eager.logits, rtol=1e-5, atol=1e-5)
    assert type(model)(tiny_config(moe, attn_implementation="eager")).config._attn_implementation == "eager"


@BOTH
def test_gradient_checkpointing_same_grads(moe):
    extra = {"router_jitter": 0.2} if moe else {}  # dropout / jitter on: checkpointing must replay the same draws
    model = tiny_model(moe, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, **extra).train()
    layers = model.base_model.encoder.layer
    calls = []
    layers[1].attention.register_forward_hook(lambda *_: calls.append(1))

    def grads():
        model.zero_grad()
        calls.clear()
        torch.manual_seed(123)
        model(pixels(), labels=LABELS).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}, len(calls)

    plain, plain_calls = grads()
    model.gradient_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in layers)
    ckpt, ckpt_calls = grads()
    assert (plain_calls, ckpt_calls) == (1, 2)  # the block really was recomputed in backward
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


@BOTH
def test_find_blocks_and_qkv_modules(moe):
    model = tiny_model(moe)
    blocks = find_blocks(model)
    assert blocks is model.base_model.encoder.layer and len(blocks) == 4
    found = qkv_modules(blocks[1])
    assert found == {"q": blocks[1].attention.query, "k": blocks[1].attention.key, "v": blocks[1].attention.value}
    with capture_qkv(model, -1) as store:
        model(pixels())
    assert set(store) == {"q", "k", "v"} and store["q"].shape == (3, SEQ, 32)


@pytest.mark.parametrize(
    ("moe", "overrides", "message"),
    [
        (False, {"image_size": 9}, r"image_size \(9\) must be divisible by patch_size \(2\)"),
        (False, {"hidden_size": 30}, r"hidden_size \(30\) must be divisible by num_attention_heads \(4\)"),
        (False, {"patch_size": 0}, "patch_size must be >= 1"),
        (True, {"num_experts": 0}, "num_experts must be >= 1"),
        (True, {"num_experts_per_tok": 5}, r"num_experts_per_tok must be in \[1, num_experts=4\]"),
        (True, {"moe_layer_frequency": 5}, r"moe_layer_frequency must be in \[1, num_hidden_layers=4\]"),
        (True, {"router_jitter": 1.5}, r"router_jitter must be in \[0, 1\)"),
        (True, {"hidden_size": 30}, r"hidden_size \(30\) must be divisible"),
    ],
)
def test_bad_configs_raise_clear_errors(moe, overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(moe, **overrides)


# ---- serialisation, Auto classes, remote code ------------------------------------------------------------

@BOTH
def test_save_load_round_trip_and_auto_classes(moe, tmp_path):
    model = tiny_model(moe, perturb=True)
    expected = model(pixels()).logits
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is type(model.config)
    saved = {k: v for k, v in config.to_dict().items() if k not in ("_name_or_path", "auto_map")}
    assert saved == {k: v for k, v in model.config.to_dict().items() if k not in ("_name_or_path", "auto_map")}
    name, prefix = ("vmoe", "VMoE") if moe else ("dense_vit", "DenseViT")
    assert {f"modeling_{name}.py", f"configuration_{name}.py"} <= files
    assert config.auto_map == {  # the saved class's Auto class (as transformers writes it) and the config
        "AutoConfig": f"configuration_{name}.{prefix}Config",
        "AutoModelForImageClassification": f"modeling_{name}.{prefix}ForImageClassification",
    }
    auto = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert type(auto) is type(model)
    torch.testing.assert_close(auto(pixels()).logits, expected, rtol=0, atol=0)
    base = AutoModel.from_pretrained(tmp_path)
    assert type(base) is (VMoEModel if moe else DenseViTModel)
    torch.testing.assert_close(base.layernorm.weight, model.base_model.layernorm.weight, rtol=0, atol=0)
    # The other direction: Auto classes build the models from a config; registration is idempotent.
    register_dense_vit()
    register_vmoe()
    assert type(AutoModelForImageClassification.from_config(tiny_config(moe))) is type(model)
    assert type(AutoModel.from_config(tiny_config(moe))) is type(base)


@BOTH
def test_remote_code_loading_without_hf_moekd(moe, tmp_path):
    model = tiny_model(moe, perturb=True)
    model.save_pretrained(tmp_path / "ckpt")
    result = fresh_process_logits(tmp_path / "ckpt", "AutoModelForImageClassification", {"pixel_values": pixels()},
                                  tmp_path)
    assert result["module"].startswith("transformers_modules"), result["module"]
    assert result["class"] == type(model).__name__
    with torch.no_grad():
        # thread counts differ
        torch.testing.assert_close(result["logits"], model(pixels()).logits, rtol=1e-5, atol=1e-6)


def test_checkpoint_saved_as_ones_still_loads(tmp_path):
    """A checkpoint from before the rename (model_type "ones", weights under `ones.`) loads through the Auto classes."""
    from safetensors.torch import load_file, save_file

    model = tiny_model(False, perturb=True)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(model_type="ones", architectures=["OneSForImageClassification"])
    del config["auto_map"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    weights = load_file(tmp_path / "model.safetensors")
    save_file({k.replace("dense_vit.", "ones.", 1): v for k, v in weights.items()}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, DenseViTForImageClassification) and loaded.config.model_type == "ones"
    torch.testing.assert_close(loaded(pixels()).logits, model(pixels()).logits, rtol=0, atol=0)
    base = AutoModel.from_pretrained(tmp_path)
    torch.testing.assert_close(base.layernorm.weight, model.base_model.layernorm.weight, rtol=0, atol=0)


# ---- DistillationTrainer ------------------------------------------------------------------------------------

def _train_logs(tmp_path, student, teacher=None, **loss) -> list[dict]:
    from hf_moekd.distillation import DistillationArguments, DistillationTrainer

    g = torch.Generator().manual_seed(0)
    data = [{"pixel_values": torch.rand(1, 8, 8, generator=g), "labels": i % 10} for i in range(8)]
    args = DistillationArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1,
        save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True, seed=0, **loss,
    )
    trainer = DistillationTrainer(model=student, args=args, teacher_model=teacher, train_dataset=data)
    trainer.train()
    return [log for log in trainer.state.log_history if "loss" in log]


def test_trainer_distils_vmoe_teacher_into_dense_vit_student(tmp_path):
    teacher = tiny_model(True, perturb=True)
    student = tiny_model(False, seed=1, num_hidden_layers=2).train()
    before = student.classifier.weight.clone()
    logs = _train_logs(tmp_path, student, teacher, alpha=0.5, hidden_loss_weight=1.0)
    assert len(logs) == 2
    for log in logs:
        assert {"loss_ce", "loss_logits_kd", "loss_hidden_mse"} <= set(log) and math.isfinite(log["loss"])
        assert "loss_router_aux" not in log  # dense student: no balancing loss
    assert not torch.equal(student.classifier.weight, before)


def test_trainer_trains_vmoe_with_router_aux(tmp_path):
    model = tiny_model(True).train()
    logs = _train_logs(tmp_path, model, alpha=0.0)
    assert len(logs) == 2
    for log in logs:
        assert {"loss_ce", "loss_router_aux"} <= set(log) and "loss_logits_kd" not in log
        assert 0.0 < log["loss_router_aux"] <= 4.0  # at most E (fractions <= 1); k = 2 when balanced
