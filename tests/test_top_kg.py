"""OneS Top-KG under our stated reading (issue 29 item 1; the paper's definition is not readable offline):
`top_kg` keeps each expert's most important hidden units (exact for them) or its largest weights."""
from __future__ import annotations

import pytest
import torch
import transformers as tf
from test_gathering import IDS, logits
from testing_utils import cli, mixtral

from hf_moekd.ones import ExpertWeights, GatheringConfig, gather_experts, merge_experts
from hf_moekd.ones.strategies import top_kg_importance

E, I, H = 4, 24, 16
USAGE = torch.tensor([0.1, 0.5, 0.05, 0.35])


def experts(seed=0, e=E, i=I, h=H, gated=True, bias=False) -> ExpertWeights:
    """Distinct random experts (gated SwiGLU, or plain ReLU with biases)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    ins = [rnd(e, i, h) for _ in range(2 if gated else 1)]
    return ExpertWeights(ins, rnd(e, h, i), [rnd(e, i) for _ in ins] if bias else None, rnd(e, h) if bias else None)


def hidden(in_proj, in_bias, x):
    """The hidden activations of an FFN (gated: silu(gate) * up; plain: relu(in + bias))."""
    pre = [x @ w.T + (0 if in_bias is None else b) for w, b in zip(in_proj, in_bias or [None] * len(in_proj))]
    return torch.nn.functional.silu(pre[0]) * pre[1] if len(pre) == 2 else torch.relu(pre[0])


def dense_out(ffn, x):
    return hidden(ffn.in_proj, ffn.in_bias, x) @ ffn.out_proj.T + (0 if ffn.out_bias is None else ffn.out_bias)


def restricted_sum(ex: ExpertWeights, w, kept: list[list[int]], x):
    """sum_e w_e * (expert e with only its `kept[e]` hidden units, plus its out bias)."""
    total = 0
    for e in range(ex.num_experts):
        mask = torch.zeros(ex.intermediate_size)
        mask[kept[e]] = 1
        hid = hidden([t[e] for t in ex.in_proj], None if ex.in_bias is None else [b[e] for b in ex.in_bias], x)
        total = total + w[e] * ((hid * mask) @ ex.out_proj[e].T + (0 if ex.out_bias is None else ex.out_bias[e]))
    return total


def stated_kept(ex: ExpertWeights, counts: list[int]) -> list[list[int]]:
    """The stated rule, computed here independently: per expert, the units with the largest
    prod(in-row norms, in-bias as one more weight) * out-column norm."""
    kept = []
    for e, n in enumerate(counts):
        score = ex.out_proj[e].norm(dim=0)
        for p, w in enumerate(ex.in_proj):
            rows = w[e] if ex.in_bias is None else torch.cat([w[e], ex.in_bias[p][e][:, None]], 1)
            score = score * rows.norm(dim=1)
        kept.append(score.argsort(descending=True)[:n].tolist())
    return kept


@pytest.mark.parametrize("gated,bias", [(True, False), (False, True)])
@pytest.mark.parametrize("width, counts", [(24, [6, 6, 6, 6]), (26, [6, 7, 6, 7])])  # remainder: most used experts
def test_unit_reading_is_exact_for_the_kept_units(gated, bias, width, counts):
    ex = experts(gated=gated, bias=bias, i=width)
    ffn = merge_experts(ex, "top_kg", usage=USAGE)
    assert ffn.out_proj.shape == (H, width) and all(t.shape == (width, H) for t in ffn.in_proj)
    x = torch.randn(11, H)
    expected = restricted_sum(ex, USAGE, stated_kept(ex, counts), x)
    torch.testing.assert_close(dense_out(ffn, x), expected, atol=1e-5, rtol=1e-5)
    assert (dense_out(merge_experts(ex, "weighted_average", usage=USAGE), x) - expected).abs().max() > 0.1


def test_one_expert_is_returned_unchanged():
    ex = experts(e=1, gated=False, bias=True)
    ffn = merge_experts(ex, "top_kg", usage=torch.tensor([3.0]))
    for a, b in zip(ffn.in_proj + ffn.in_bias + [ffn.out_proj, ffn.out_bias],
                    [ex.in_proj[0][0], ex.in_bias[0][0], ex.out_proj[0], ex.out_bias[0]]):
        assert torch.equal(a, b)


def test_importance_orders_units_by_norms_times_usage():
    ex = experts(e=2, i=6)
    with torch.no_grad():
        for t in ex.in_proj:
            t.copy_(torch.nn.functional.normalize(t, dim=-1))
        ex.out_proj.copy_(torch.nn.functional.normalize(ex.out_proj, dim=1))  # every unit's norms 1
        ex.out_proj[:, :, 4] *= 5.0       # unit 4: large out column
        ex.in_proj[0][:, 2] *= 3.0        # unit 2: large gate row
        ex.in_proj[1][:, 2] *= 2.0        # ... and large up row: 6 > 5
        ex.in_proj[0][:, 0] *= 10.0       # unit 0: large gate row, tiny out column: 10 * 0.01 < 1
        ex.out_proj[:, :, 0] *= 0.01
    score = top_kg_importance(ex, torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(score[0], torch.tensor([0.1, 1, 6, 1, 5, 1]) * 0.25)  # times usage (normalised)
    torch.testing.assert_close(score[1], score[0] * 3)
    x = torch.randn(5, H)
    ffn = merge_experts(ex, "top_kg", usage=torch.tensor([1.0, 3.0]), units=2)  # units 2 and 4 of each expert
    expected = restricted_sum(ex, torch.tensor([0.25, 0.75]), [[2, 4], [2, 4]], x)
    torch.testing.assert_close(dense_out(ffn, x), expected, atol=1e-5, rtol=1e-5)


def test_units_option_and_unused_experts():
    ex = experts()
    ffn = merge_experts(ex, "top_kg", usage=USAGE, units=2)  # 8 units kept, 16 zero units
    assert ffn.out_proj.shape == (H, I) and ffn.out_proj[:, 8:].abs().sum() == 0 and ffn.in_proj[0][8:].abs().sum() == 0
    x = torch.randn(7, H)
    torch.testing.assert_close(dense_out(ffn, x), restricted_sum(ex, USAGE, stated_kept(ex, [2] * E), x),
                               atol=1e-5, rtol=1e-5)
    usage = torch.tensor([0.0, 0.5, 0.2, 0.3])  # expert 0 never routed to: its share goes to the used ones
    ffn = merge_experts(ex, "top_kg", usage=usage)
    torch.testing.assert_close(dense_out(ffn, x), restricted_sum(ex, usage, stated_kept(ex, [0, 8, 8, 8]), x),
                               atol=1e-5, rtol=1e-5)


def test_weight_reading_keeps_the_fraction_of_each_expert_then_averages():
    ex = experts(gated=False, bias=True)

    def masked(m, fraction):
        n = round(fraction * m.numel())
        kept = torch.where(m.abs() >= m.abs().flatten().kthvalue(m.numel() - n + 1).values, m, torch.zeros(()))
        assert int((kept != 0).sum()) == n  # exactly the stated fraction of this expert matrix
        return kept

    for fraction, options in ((0.25, {"keep_fraction": 0.25}), (1 / E, {})):
        ffn = merge_experts(ex, "top_kg", usage=USAGE, granularity="weight", **options)
        w = USAGE / USAGE.sum()
        torch.testing.assert_close(ffn.in_proj[0], sum(w[e] * masked(ex.in_proj[0][e], fraction) for e in range(E)))
        torch.testing.assert_close(ffn.out_proj, sum(w[e] * masked(ex.out_proj[e], fraction) for e in range(E)))
        torch.testing.assert_close(ffn.in_bias[0], sum(w[e] * ex.in_bias[0][e] for e in range(E)))  # biases unpruned
    full = merge_experts(ex, "top_kg", usage=USAGE, granularity="weight", keep_fraction=1.0)
    average = merge_experts(ex, "weighted_average", usage=USAGE)
    for a, b in zip(full.in_proj + [full.out_proj], average.in_proj + [average.out_proj]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("options, message", [
    ({"granularity": "neuron"}, "unknown top_kg granularity 'neuron'; choose one of ['unit', 'weight']"),
    ({"units": 0}, "top_kg units must be an integer >= 1, got 0"),
    ({"units": 7}, "top_kg units=7 x 4 used experts = 28 hidden units exceed the dense width 24: use units <= 6"),
    ({"granularity": "weight", "keep_fraction": 1.5}, "top_kg keep_fraction must be a number in (0, 1], got 1.5"),
    ({"keep_fraction": 0.5}, "top_kg keep_fraction is for granularity 'weight'"),
    ({"granularity": "weight", "units": 2}, "top_kg units is for granularity 'unit'"),
])
def test_bad_options_give_one_line(options, message):
    with pytest.raises(ValueError) as err:
        merge_experts(experts(), "top_kg", **options)
    assert message in str(err.value) and "\n" not in str(err.value)


def one_function_on_disjoint_units(model):
    """Every expert computes the same FFN g (I / E units), each with its own block of hidden units, the rest zero:
    the MoE layer computes g whatever the routing, and so does `top_kg`'s dense FFN; averaging does not."""
    with torch.no_grad():
        for layer in model.model.layers:
            gate_up, down = layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj
            e, i = down.shape[0], down.shape[2]
            block = i // e
            sub_gate, sub_up, sub_down = gate_up[0, :block].clone(), gate_up[0, i:i + block].clone(), down[0, :, :block].clone()
            gate_up.zero_(), down.zero_()
            for k in range(e):
                units = slice(k * block, (k + 1) * block)
                gate_up[k, units], gate_up[k, i + k * block:i + (k + 1) * block], down[k, :, units] = sub_gate, sub_up, sub_down
    return model


def test_gather_experts_top_kg_writes_a_stock_checkpoint(tmp_path):
    moe = one_function_on_disjoint_units(mixtral())
    out = gather_experts(moe, "top_kg", calibration_dataset=[IDS], output_dir=tmp_path / "dense", progress=False)
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert type(loaded).__name__ == "MistralForCausalLM" and type(out).__name__ == "MistralForCausalLM"
    torch.testing.assert_close(logits(loaded), logits(moe), atol=1e-5, rtol=0)
    averaged = gather_experts(moe, "weighted_average", calibration_dataset=[IDS], progress=False)
    assert (logits(averaged) - logits(moe)).abs().max() > 1e-3
    weight = gather_experts(moe, GatheringConfig("top_kg", granularity="weight", keep_fraction=0.5), progress=False)
    assert type(weight).__name__ == "MistralForCausalLM"


def test_cli_gather_top_kg(tmp_path):
    moe = one_function_on_disjoint_units(mixtral())
    moe.save_pretrained(tmp_path / "moe")
    assert cli("gather", tmp_path / "moe", tmp_path / "dense", "--strategy", "top_kg", "--granularity", "unit",
               "--units", "4") == 0
    torch.testing.assert_close(logits(tf.AutoModelForCausalLM.from_pretrained(tmp_path / "dense")), logits(moe),
                               atol=1e-5, rtol=0)
    assert cli("gather", tmp_path / "moe", tmp_path / "w", "--strategy", "top_kg", "--granularity", "weight",
               "--keep_fraction", "0.25") == 0
    assert cli("gather", tmp_path / "moe", tmp_path / "bad", "--strategy", "top_kg", "--keep_fraction", "0.25") != 0
    assert not (tmp_path / "bad").exists()
