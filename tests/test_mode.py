"""MoDE (mutual distillation among experts): expert capture on every supported MoE family, the loss and its
gradients, the routed/top-1 refusal, the DistillationTrainer term and the plain-Trainer mixin, expert probing on a
hand-built MoE, diversity measures, the probing plot."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import (
    MixtralConfig,
    MixtralForSequenceClassification,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForSequenceClassification,
    TrainingArguments,
)

from hf_moekd.analysis import (
    expert_output_similarity,
    expert_weight_similarity,
    mean_pairwise_cosine,
    plot_probe,
    probe_experts,
)
from hf_moekd.distillation import LOSS_REGISTRY, DistillationArguments, DistillationTrainer
from hf_moekd.models.minimoe import MiniMoEConfig, MiniMoEForSequenceClassification
from hf_moekd.models.vmoe import VMoEConfig, VMoEForImageClassification
from hf_moekd.models.vmoe.modeling_vmoe import VMoEExperts, top_k_routing
from hf_moekd.mode import (
    MoDEConfig,
    MoDELoss,
    MoDETrainer,
    check_mode,
    find_experts,
    mode_loss_per_example,
    mutual_distillation,
    patch_experts,
)
from testing_utils import VOCAB, tiny_dataset

TEXT = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, pad_token_id=0)


def build(family: str, seed: int = 0, top_k: int = 2) -> nn.Module:
    """A tiny MoE of `family` with 4 experts per MoE layer (2 MoE layers), in eval mode."""
    torch.manual_seed(seed)
    if family == "vmoe":
        config = VMoEConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=24, num_labels=3, num_experts=4,
                            num_experts_per_tok=top_k, moe_layer_frequency=1, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0)
        return VMoEForImageClassification(config).eval()
    if family == "minimoe":
        config = MiniMoEConfig(**TEXT, intermediate_size=24, num_ffn_experts=4, num_labels=3, hidden_dropout_prob=0.0,
                               attention_probs_dropout_prob=0.0, expert_shared_fraction=0.0)
        return MiniMoEForSequenceClassification(config).eval()
    if family == "mixtral":
        config = MixtralConfig(**TEXT, intermediate_size=24, num_key_value_heads=2, num_local_experts=4,
                               num_experts_per_tok=top_k, num_labels=3)
        return MixtralForSequenceClassification(config).eval()
    if family == "qwen2_moe":
        config = Qwen2MoeConfig(**TEXT, intermediate_size=48, moe_intermediate_size=24,
                                shared_expert_intermediate_size=24, num_key_value_heads=2, num_experts=4,
                                num_experts_per_tok=top_k, num_labels=3)
        return Qwen2MoeForSequenceClassification(config).eval()
    config = OlmoeConfig(**TEXT, intermediate_size=24, num_key_value_heads=2, num_experts=4, num_experts_per_tok=top_k,
                         eos_token_id=None, bos_token_id=None)
    return OlmoeForCausalLM(config).eval()


def inputs_for(family: str, batch: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    if family == "vmoe":
        return {"pixel_values": torch.rand(batch, 1, 8, 8, generator=g)}
    mask = torch.ones(batch, 7, dtype=torch.long)
    mask[0, 5:] = 0  # one padded row
    return {"input_ids": torch.randint(1, VOCAB, (batch, 7), generator=g), "attention_mask": mask}


def make_experts_identical(model: nn.Module) -> None:
    with torch.no_grad():
        for adapter in find_experts(model).values():
            for param in adapter.module.parameters(recurse=False):
                param.copy_(param[:1].expand_as(param))


def expert_slices(adapter) -> torch.Tensor:
    """Per-expert gradient mass of every expert parameter of one experts module: `[E]`."""
    E = adapter.num_experts
    grads = [p.grad.reshape(E, -1).abs().sum(1) for p in adapter.module.parameters(recurse=False) if p.grad is not None]
    return torch.stack(grads).sum(0)


FAMILIES = ["vmoe", "minimoe", "mixtral", "qwen2_moe", "olmoe"]
TOP_K_FAMILIES = [f for f in FAMILIES if f != "minimoe"]


# ---- capture -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_patched_experts_reproduce_the_model_and_record_outputs(family):
    model, inputs = build(family), inputs_for(family)
    with torch.no_grad():
        reference = model(**inputs).logits
    adapters = find_experts(model)
    assert len(adapters) == 2 and all(a.num_experts == 4 for a in adapters.values())
    k = 1 if family == "minimoe" else 2
    tokens = 3 * (17 if family == "vmoe" else 7)
    for record in (None, "routed", "all"):
        if record == "routed" and k == 1:
            continue
        with torch.no_grad(), patch_experts(model, record=record) as calls:
            logits = model(**inputs).logits
        torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-6)
        assert [c.layer for c in calls] == list(adapters)
        assert all(tuple(c.index.shape) == (tokens, k) for c in calls)
        width = {None: None, "routed": k, "all": 4}[record]
        assert all((c.outputs is None) if width is None else tuple(c.outputs.shape) == (tokens, width, 32) for c in calls)
        if record == "all":  # the routed experts' outputs are the matching columns of 'all'
            call = calls[0]
            with patch_experts(model, record="routed" if k > 1 else None) as routed_calls:
                model(**inputs)
            if k > 1:
                picked = call.outputs.gather(1, call.index.unsqueeze(-1).expand(-1, -1, 32))
                torch.testing.assert_close(picked, routed_calls[0].outputs, rtol=1e-5, atol=1e-7)
    assert all("forward" not in vars(a.module) for a in adapters.values())  # patch removed


def test_hand_computed_loss_and_detached_target():
    y = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [2.0, 4.0]]], requires_grad=True)  # one token, m = 3, H = 2
    others = torch.tensor([[2.5, 3.0], [1.5, 2.0], [2.0, 1.0]])
    scale = (0.5 + 6.5 + 10.0) / 3  # mean over experts of mean_h y^2
    expected = ((y.detach()[0] - others) ** 2).mean() / scale
    loss = mutual_distillation(y)
    assert loss.shape == (1,) and loss.item() == pytest.approx(expected.item())
    loss.sum().backward()
    # Target and scale detached: d/dy_j = 2 / (m H s) (y_j - mean of the others), nothing from being a target.
    torch.testing.assert_close(y.grad[0], 2 / (6 * scale) * (y.detach()[0] - others))
    pair = torch.tensor([[[1.0, 2.0], [3.0, -2.0]]])  # m = 2: mean((y1 - y2)^2) / mean(y^2)
    assert mutual_distillation(pair).item() == pytest.approx(((4 + 16) / 2) / ((2.5 + 6.5) / 2))
    assert mutual_distillation(100 * pair).item() == pytest.approx(mutual_distillation(pair).item())  # scale-free


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_is_zero_for_identical_experts(family):
    model, inputs = build(family), inputs_for(family)
    make_experts_identical(model)
    for mode in ("routed", "all") if family != "minimoe" else ("all",):
        with patch_experts(model, record=mode) as calls:
            model(**inputs)
        assert mode_loss_per_example(calls, 3, inputs.get("attention_mask")).abs().max().item() < 1e-12


@pytest.mark.parametrize("family,mode", [(f, m) for f in FAMILIES for m in ("routed", "all")
                                         if (f, m) != ("minimoe", "routed")])  # top-1: test_routed_refuses_top1
def test_loss_positive_and_gradient_reaches_every_participating_expert(family, mode):
    model, inputs = build(family), inputs_for(family)
    model.train()
    with patch_experts(model, record=mode) as calls:
        model(**inputs)
    per_example = mode_loss_per_example(calls, 3, inputs.get("attention_mask"))
    assert per_example.shape == (3,) and (per_example > 0).all()
    per_example.sum().backward()
    for call in calls:
        grad = expert_slices(find_experts(model)[call.layer])
        used = set(call.index.unique().tolist()) if mode == "routed" else set(range(4))
        assert len(used) >= 2
        for e in range(4):
            assert (grad[e] > 0) == (e in used), (call.layer, e, grad.tolist(), used)
    if family == "vmoe":  # outputs before gate weighting: the last router gets no MoDE gradient
        assert model.vmoe.encoder.layer[-1].mlp.router.gate.weight.grad is None


def test_padding_tokens_do_not_count():
    model, inputs = build("mixtral"), inputs_for("mixtral")
    with patch_experts(model, record="all") as calls:
        model(**inputs)
    full = mode_loss_per_example(calls, 3, inputs["attention_mask"])
    with patch_experts(model, record="all") as calls:
        model(input_ids=inputs["input_ids"][:1, :5])  # row 0 without its padding
    alone = mode_loss_per_example(calls, 1, None)
    assert full[0].item() == pytest.approx(alone[0].item(), rel=1e-4)


@pytest.mark.parametrize("family", ["minimoe", "mixtral"])
def test_routed_refuses_top1(family):
    model = build(family, top_k=1)
    assert MoDEConfig().variant == "all" and MoDELoss(model).variant == "all"  # the default works on top-1
    for make in (lambda: check_mode(model, "routed"), lambda: MoDELoss(model, variant="routed"),
                 lambda: MoDETrainer(model=model, args=TrainingArguments("unused", use_cpu=True, report_to=[]),
                                     mode_config=MoDEConfig(variant="routed"))):
        with pytest.raises(ValueError, match=r"variant='all'.*mode_all=<alpha>.*num_experts_per_tok >= 2"):
            make()
    check_mode(model, "all")  # all experts: fine
    with pytest.raises(ValueError, match="must be one of"):
        MoDEConfig(variant="every")
    with pytest.raises(ValueError, match="no supported MoE experts"):
        check_mode(nn.Linear(2, 2), "all")


# ---- trainers ------------------------------------------------------------------------------------------------

def image_dataset(n: int = 24) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"pixel_values": torch.rand(1, 8, 8, generator=g), "labels": torch.tensor(i % 3)} for i in range(n)]


def mode_logs(history: list[dict], key: str = "loss_mode") -> list[float]:
    return [h[key] for h in history if key in h]


@pytest.mark.parametrize("term,variant", [("mode", "all"), ("mode_all", "all"), ("mode=0.5,variant=routed", "routed")])
def test_distillation_trainer_trains_with_the_term(tmp_path, term, variant):
    model = build("vmoe").train()
    before = model.vmoe.encoder.layer[0].mlp.experts.w_in.detach().clone()
    spec = term if "=" in term else f"{term}=0.5"
    term = term.split("=")[0]
    args = DistillationArguments(output_dir=str(tmp_path), alpha=0.0, extra_loss_terms=[spec], max_steps=3,
                                 per_device_train_batch_size=8, learning_rate=1e-2, logging_steps=1, save_strategy="no",
                                 report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = DistillationTrainer(model=model, args=args, train_dataset=image_dataset())
    assert trainer.loss_terms[term].variant == variant and term in LOSS_REGISTRY
    trainer.train()
    values = mode_logs(trainer.state.log_history, f"loss_{term}")
    assert len(values) == 3 and all(v > 0 for v in values)
    assert not torch.equal(before, model.vmoe.encoder.layer[0].mlp.experts.w_in)


def test_distillation_trainer_term_value_is_the_per_example_mean(tmp_path):
    model = build("vmoe").train()
    args = DistillationArguments(output_dir=str(tmp_path), alpha=0.0, extra_loss_terms=["mode_all=1"], report_to=[],
                                 use_cpu=True)
    trainer = DistillationTrainer(model=model, args=args, train_dataset=image_dataset())
    batch = {"pixel_values": torch.stack([r["pixel_values"] for r in image_dataset(4)]),
             "labels": torch.arange(4) % 3}
    loss = trainer.compute_loss(model, batch)
    with torch.no_grad(), patch_experts(model, record="all") as calls:
        out = model(**batch)
    expected = torch.nn.functional.cross_entropy(out.logits, batch["labels"]) + 0.01 * out.aux_loss
    expected = expected + mode_loss_per_example(calls, 4).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_distillation_trainer_refuses_routed_minimoe(tmp_path):
    args = DistillationArguments(output_dir=str(tmp_path), alpha=0.0, extra_loss_terms=["mode=0.1,variant=routed"],
                                 report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="mode_all"):
        DistillationTrainer(model=build("minimoe"), args=args, train_dataset=tiny_dataset(8))


def test_plain_trainer_mixin(tmp_path):
    model = build("mixtral").train()
    data = tiny_dataset(24, seq=8, ragged=True)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=8, learning_rate=1e-2,
                             logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = MoDETrainer(model=model, args=args, train_dataset=data, mode_config=MoDEConfig(mode_alpha=2.0, variant="routed"))
    batch = {k: torch.tensor(data[:4][k]) for k in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
        with patch_experts(model, record="routed") as calls:
            plain = model(**batch).loss
        expected = plain + 2.0 * mode_loss_per_example(calls, 4, batch["attention_mask"]).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5) and loss.item() > plain.item()
    model.eval()
    assert trainer.compute_loss(model, batch).item() == pytest.approx(model(**batch).loss.item())  # eval: model loss
    model.train()
    trainer.train()
    values = mode_logs(trainer.state.log_history)
    assert len(values) == 3 and all(v > 0 for v in values)


def lm_dataset(n: int = 8) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(1, VOCAB, (8,), generator=g) for _ in range(n)]
    return [{"input_ids": ids, "attention_mask": torch.ones(8, dtype=torch.long), "labels": ids} for ids in rows]


@pytest.mark.parametrize("family", ["vmoe", "olmoe"])  # the Trainer divides by the accumulation steps / the model normalises
def test_plain_trainer_mixin_is_exact_under_gradient_accumulation(tmp_path, family):
    """One SGD step on 8 examples equals two accumulated micro-batches of 4, and MoDE visibly changes the step."""
    data = image_dataset(8) if family == "vmoe" else lm_dataset(8)
    params = {}
    for alpha, batch, accumulation in ((0.0, 8, 1), (100.0, 8, 1), (100.0, 4, 2)):
        model = build(family).train()
        model.config.router_aux_loss_coef = 0.0  # V-MoE's balancing loss is not additive over micro-batches
        with torch.no_grad():  # larger expert outputs than at initialisation, so that MoDE weighs in the step
            for adapter in find_experts(model).values():
                for param in adapter.module.parameters(recurse=False):
                    param.mul_(5)
        args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=batch,
                                 gradient_accumulation_steps=accumulation, learning_rate=0.5, optim="sgd",
                                 lr_scheduler_type="constant", max_grad_norm=0.0, save_strategy="no", report_to=[],
                                 use_cpu=True, disable_tqdm=True)
        MoDETrainer(model=model, args=args, train_dataset=data, mode_config=MoDEConfig(mode_alpha=alpha)).train()
        params[alpha, batch] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert (params[100.0, 8] - params[0.0, 8]).abs().max() > 1e-2
    # Float reduction order differs between batch shapes and thread counts; a scaling error would be ~1e-2.
    torch.testing.assert_close(params[100.0, 4], params[100.0, 8], rtol=1e-3, atol=1e-5)


# ---- probing -------------------------------------------------------------------------------------------------

class HandBuiltMoE(nn.Module):
    """One-token classifier over x = (a, b): top-2 of 3 affine experts whose outputs are the logits.

    Router logits 10 * (a, b, -a - b). Expert 0 always says class 0, expert 1 always class 1, expert 2 says
    argmax(a, b).
    """

    def __init__(self) -> None:
        super().__init__()
        self.experts = VMoEExperts(SimpleNamespace(hidden_size=2, intermediate_size=2, hidden_act="linear", num_experts=3))
        self.gate = nn.Linear(2, 3, bias=False)
        with torch.no_grad():
            self.gate.weight.copy_(10 * torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
            for param in (self.experts.w_in, self.experts.b_in, self.experts.w_out, self.experts.b_out):
                param.zero_()
            self.experts.b_out[0] = torch.tensor([2.0, 0.0])
            self.experts.b_out[1] = torch.tensor([0.0, 2.0])
            self.experts.w_in[2] = torch.eye(2)
            self.experts.w_out[2] = torch.eye(2)

    def forward(self, x: torch.Tensor) -> SimpleNamespace:
        weights, index = top_k_routing(self.gate(x), 2)
        return SimpleNamespace(logits=self.experts(x, index, weights))


def test_probing_a_hand_built_moe():
    x = torch.tensor([[1, 0.5], [1, 0.2],                 # -> expert 0 (says 0): labels 0, 1 -> 1/2
                      [0.5, 1], [0.2, 1], [0.1, 0.9],     # -> expert 1 (says 1): labels 1, 1, 0 -> 2/3
                      [-1, -0.5], [-0.5, -1], [-0.2, -1]])  # -> expert 2 (argmax): says 1, 0, 0; labels 1, 1, 0 -> 2/3
    labels = torch.tensor([0, 1, 1, 1, 0, 1, 1, 0])
    model = HandBuiltMoE()
    batches = iter([{"x": x[:5], "labels": labels[:5]}, {"x": x[5:], "labels": labels[5:]}])
    result = probe_experts(model, batches)
    assert [(r.layer, r.expert, r.samples) for r in result.rows] == [("experts", 0, 2), ("experts", 1, 3),
                                                                      ("experts", 2, 3)]
    assert [r.probe_accuracy for r in result.rows] == pytest.approx([1 / 2, 2 / 3, 2 / 3])
    assert [r.token_share for r in result.rows] == [1.0, 1.0, 1.0]
    with torch.no_grad():
        correct = model(x).logits.argmax(-1) == labels
    assert [r.model_accuracy for r in result.rows] == pytest.approx(
        [correct[:2].float().mean().item(), correct[2:5].float().mean().item(), correct[5:].float().mean().item()])
    assert result.samples == 8 and result.model_accuracy == pytest.approx(correct.float().mean().item())
    assert result.mean_probe_accuracy() == pytest.approx((1 / 2 + 2 / 3 + 2 / 3) / 3)
    assert result.weighted_probe_accuracy() == pytest.approx(5 / 8)
    table = result.to_markdown()
    assert "| experts | 0 | 2 | 100.0 |" in table and "| 50.0 |" in table and "mean per-expert probing accuracy 61.1 %" in table


def test_probing_vmoe_identical_experts_match_the_model(tmp_path):
    model = build("vmoe")
    make_experts_identical(model)  # normalised top-k of equal experts = any expert alone
    data = image_dataset(20)
    result = probe_experts(model, data, batch_size=8)
    assert len(result.rows) == 8 and result.samples == 20
    for layer in result.layers():
        rows = [r for r in result.rows if r.layer == layer]
        assert sum(r.samples for r in rows) == 20
        for r in rows:
            if r.samples:
                assert r.probe_accuracy == r.model_accuracy and 0 < r.token_share <= 1
            else:
                assert r.probe_accuracy is None and r.token_share is None
    assert result.to_dict()["mean_probe_accuracy"] == result.mean_probe_accuracy()


def test_probing_sample_allocation_is_the_majority_top1_over_real_tokens():
    model = build("minimoe")
    data = tiny_dataset(6, seq=8, ragged=True)
    batch = {k: torch.tensor(data[:][k]) for k in ("input_ids", "attention_mask", "labels")}
    result = probe_experts(model, iter([batch]))
    with torch.no_grad(), patch_experts(model) as calls:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    top1 = calls[0].index[:, 0].view(6, 8)
    expected = [0] * 4
    for row, mask in zip(top1, batch["attention_mask"].bool()):
        expected[int(torch.bincount(row[mask], minlength=4).argmax())] += 1
    assert [r.samples for r in result.rows if r.layer == calls[0].layer] == expected
    lengths = batch["attention_mask"].sum(1)
    for position, picked in ((0, top1[:, 0]), (-1, top1[torch.arange(6), lengths - 1])):
        result = probe_experts(model, iter([batch]), allocate_by=position)
        counts = torch.bincount(picked, minlength=4).tolist()
        assert [r.samples for r in result.rows if r.layer == calls[0].layer] == counts
    with pytest.raises(ValueError, match="outside some samples' real tokens"):
        probe_experts(model, iter([batch]), allocate_by=7)


def test_plot_probe_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    result = probe_experts(build("vmoe"), image_dataset(12), batch_size=6)
    path = plot_probe(result, tmp_path / "plots" / "probe.png", title="tiny V-MoE")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2000


# ---- diversity -----------------------------------------------------------------------------------------------

def test_mean_pairwise_cosine_hand_computed():
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert mean_pairwise_cosine(v).item() == pytest.approx((0 + 2 / math.sqrt(2)) / 3)


def test_diversity_measures_and_mode_collapses_experts():
    model = build("vmoe")
    data = image_dataset(8)
    weights, outputs = expert_weight_similarity(model), expert_output_similarity(model, data)
    assert set(weights) == set(outputs) == set(find_experts(model))
    assert all(abs(v) < 0.2 for v in weights.values()) and all(v < 0.5 for v in outputs.values())
    # Strong MoDE alone pulls every expert toward the others: the outputs become alike.
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    batch = {"pixel_values": torch.stack([r["pixel_values"] for r in data])}
    for _ in range(15):
        with patch_experts(model, record="all") as calls:
            model(**batch)
        optimizer.zero_grad()
        mode_loss_per_example(calls, 8).mean().backward()
        optimizer.step()
    after = expert_output_similarity(model, data)
    assert all(after[k] > outputs[k] + 0.3 for k in outputs), (outputs, after)
    identical = build("vmoe")
    make_experts_identical(identical)
    assert all(v == pytest.approx(1.0) for v in expert_weight_similarity(identical).values())
    assert all(v == pytest.approx(1.0, abs=1e-5) for v in expert_output_similarity(identical, data).values())


# ---- defaults from the evidence, collapse warning (issue 29.2) ---------------------------------------------------

def test_default_strength_is_the_measured_one():
    import json
    from pathlib import Path

    from hf_moekd.mode import DEFAULT_MODE_ALPHA

    headline = json.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "mode_all.json").read_text())
    assert MoDEConfig().mode_alpha == DEFAULT_MODE_ALPHA == headline["headline"]["fashion_mnist"]["best_alpha"] == 0.003
    with pytest.raises(ValueError, match="collapse_cosine"):
        MoDEConfig(collapse_cosine=0.0)


def test_collapsing_experts_are_warned_about_once_per_layer(caplog):
    import logging

    model = build("vmoe")
    data = image_dataset(8)
    batch = {"pixel_values": torch.stack([r["pixel_values"] for r in data])}
    term = MoDELoss(model, None)
    with caplog.at_level(logging.WARNING, logger="hf_moekd.mode.collapse"):
        with term.capture("student", model):
            model(**batch)
        term(SimpleNamespace(inputs=batch, per_example=lambda x: x))
    assert not caplog.records and all(v < 0.5 for v in term.collapse.last.values())  # distinct experts: quiet
    make_experts_identical(model)
    with caplog.at_level(logging.WARNING, logger="hf_moekd.mode.collapse"):
        for _ in range(2):
            with term.capture("student", model):
                model(**batch)
            term(SimpleNamespace(inputs=batch, per_example=lambda x: x))
    layers = set(find_experts(model))
    assert len(caplog.records) == len(layers) and all("collapsing into copies" in r.getMessage() for r in caplog.records)
    assert all(v == pytest.approx(1.0, abs=1e-5) for v in term.collapse.last.values())
