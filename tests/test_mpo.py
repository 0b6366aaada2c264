"""MPO over-parameterisation (OPDF): decomposition, MPOLinear, model surgery, tensor constraint loss."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from hf_moekd.distillation import LOSS_REGISTRY, DistillationArguments, DistillationBatch, DistillationTrainer
from hf_moekd.opdf import (
    MPOConfig,
    MPOConstraintLoss,
    MPOLinear,
    auto_factors,
    contract_overparameterized,
    default_layer_map,
    mpo_contract,
    mpo_decompose,
    mpo_modules,
    overparameterize,
)
from hf_moekd.model_utils.students import student_from_teacher_layers
from testing_utils import tiny_bert, tiny_dataset


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ---- decomposition ---------------------------------------------------------------------------------
def test_auto_factors_are_opdf_style():
    assert auto_factors(3072) == [64, 1, 1, 1, 48]
    assert auto_factors(768) == [32, 1, 1, 1, 24]
    assert auto_factors(384) == [24, 1, 1, 1, 16]
    assert auto_factors(1536, n=3) == [48, 1, 32]
    assert auto_factors(7) == [7, 1, 1, 1, 1]


def test_bert_sized_round_trip_is_exact_and_overparameterizes():
    torch.manual_seed(0)
    linear = nn.Linear(3072, 768)  # weight [768, 3072], like BERT-base output.dense
    layer = MPOLinear.from_linear(linear)
    assert [tuple(c.shape) for c in layer.cores] == [(1, 32, 64, 1152), (1152, 1, 1, 1152), (1152, 1, 1, 1152),
                                                     (1152, 1, 1, 1152), (1152, 24, 48, 1)]
    assert layer.cores[0].dtype == torch.float32 and layer.truncation_error == 0.0
    assert rel_err(layer.weight(), linear.weight) <= 1e-5
    assert layer.central_index == 2 and layer.auxiliary_indices == [0, 1, 3, 4]
    assert 3.2 < layer.overparameterization_ratio < 3.3  # 7,668,480 / 2,360,064


@pytest.mark.parametrize(
    "shape,rows,cols,center",
    [((24, 60), [2, 3, 4], [5, 3, 4], None), ((64, 32), [4, 4, 2, 2], [2, 2, 2, 4], 0),
     ((30, 16), [30, 1], [4, 4], 1), ((36, 48), auto_factors(36), auto_factors(48), 4), ((5, 7), [5], [7], None)],
)
def test_round_trip_random_shapes(shape, rows, cols, center):
    torch.manual_seed(1)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        w = torch.randn(shape, dtype=dtype)
        dec = mpo_decompose(w, rows, cols, center=center)
        assert dec.truncation_error == 0.0 and all(c.dtype == dtype for c in dec.cores)
        assert [(c.shape[1], c.shape[2]) for c in dec.cores] == list(zip(rows, cols))
        out = mpo_contract(dec.cores)
        assert out.shape == w.shape and rel_err(out, w) <= tol


def test_auxiliary_tensors_are_isometries():
    w = torch.randn(48, 40, dtype=torch.float64)
    dec = mpo_decompose(w, [4, 3, 4], [2, 5, 4], gauge="center")
    left, right = dec.cores[0].reshape(-1, dec.cores[0].shape[-1]), dec.cores[2].reshape(dec.cores[2].shape[0], -1)
    torch.testing.assert_close(left.T @ left, torch.eye(left.shape[1], dtype=torch.float64))
    torch.testing.assert_close(right @ right.T, torch.eye(right.shape[0], dtype=torch.float64))
    assert dec.cores[1].norm().item() == pytest.approx(w.norm().item())  # all the weight's norm is in the centre


def test_truncation_error_is_reported_and_decreases_with_max_bond():
    torch.manual_seed(2)
    w = torch.randn(96, 64)
    errors = []
    for bond in (4, 16, 48, 256):
        dec = mpo_decompose(w, auto_factors(96), auto_factors(64), max_bond=bond)
        assert max(dec.bond_dims) <= bond
        actual = rel_err(mpo_contract([c.double() for c in dec.cores]), w)
        assert dec.truncation_error == pytest.approx(actual, rel=1e-4, abs=1e-6)
        errors.append(dec.truncation_error)
    assert errors[0] > errors[1] > errors[2] > 0 and errors[3] == 0.0  # 256 exceeds every bond: no truncation


@pytest.mark.parametrize(
    "rows,cols,expected",
    [([4, 4, 2], [8, 2, 2], "row_factors [4, 4, 2] (product 32) do not factorise the row dimension 24"),
     ([4, 6], [8, 4], "col_factors [8, 4] (product 32) do not factorise the column dimension 16"),
     ([4, 6], [4, 2, 2], "the same length"),
     ([0, 24], [16, 1], "positive factors")],
)
def test_bad_factorisations_raise_clear_errors(rows, cols, expected):
    with pytest.raises(ValueError, match="auto_factors") as err:
        mpo_decompose(torch.randn(24, 16), rows, cols)
    assert expected in str(err.value)


# ---- MPOLinear -------------------------------------------------------------------------------------
def test_mpo_linear_matches_linear_and_every_core_gets_gradient():
    torch.manual_seed(3)
    linear = nn.Linear(384, 1536)
    layer = MPOLinear.from_linear(linear)
    x = torch.randn(4, 8, 384)
    torch.testing.assert_close(layer(x), linear(x), rtol=1e-4, atol=1e-5)
    layer(x).pow(2).mean().backward()
    assert all(c.grad is not None and c.grad.abs().sum() > 0 for c in layer.cores)
    assert layer.bias.grad.abs().sum() > 0
    # 1,639,936 / 591,360 trainable parameters: rows [48,1,1,1,32], cols [24,1,1,1,16], bonds 512
    assert layer.num_parameters_overparameterized == 1_639_936 and layer.num_parameters_linear == 591_360
    assert layer.overparameterization_ratio == pytest.approx(2.773, abs=1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the weight is rebuilt in fp32, only the matmul is bf16
        assert layer.weight().dtype == torch.float32 and layer(x).dtype == torch.bfloat16
    back = layer.to_linear()
    assert type(back) is nn.Linear and rel_err(back.weight, linear.weight) <= 1e-5


# ---- model surgery ---------------------------------------------------------------------------------
def tiny_bert99(seed: int = 0, layers: int = 2) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=37 * 2, max_position_embeddings=32, num_labels=3)
    return BertForSequenceClassification(config).eval()


def test_contract_of_overparameterize_reproduces_the_model(tmp_path):
    model = tiny_bert99()
    ids = torch.randint(0, 99, (3, 10))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    keys, count = list(model.state_dict()), sum(p.numel() for p in model.parameters())

    report = overparameterize(model)
    assert report.num_replaced == 12 and report.params_before == count and report.ratio > 1.3
    assert len(mpo_modules(model)) == 12 and "replaced 12 linears" in str(report)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)

    contract_overparameterized(model)
    assert type(model) is BertForSequenceClassification and not mpo_modules(model)
    assert list(model.state_dict()) == keys and sum(p.numel() for p in model.parameters()) == count
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path)
    reloaded = BertForSequenceClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_target_module_selection_is_peft_like():
    model = tiny_bert99()
    report = overparameterize(model, target_modules=["query", "intermediate.dense"], factors={32: [4, 1, 8]})
    assert report.replaced == [f"bert.encoder.layer.{i}.{m}" for i in range(2) for m in ("attention.self.query", "intermediate.dense")]
    assert mpo_modules(model)["bert.encoder.layer.0.attention.self.query"].row_factors == [4, 1, 8]
    assert mpo_modules(model)["bert.encoder.layer.0.intermediate.dense"].row_factors == auto_factors(74, 3)

    model = tiny_bert99()
    report = overparameterize(model, config=MPOConfig(target_modules=r".*layer\.1\..*(key|value)", max_bond=4))
    assert report.replaced == ["bert.encoder.layer.1.attention.self.key", "bert.encoder.layer.1.attention.self.value"]
    assert report.max_truncation_error > 0
    with pytest.raises(ValueError, match=r"No nn.Linear .* matches .*bert.encoder.layer.0.attention.self.query"):
        overparameterize(tiny_bert99(), target_modules=["q_proj"])


# ---- tensor constraint loss ------------------------------------------------------------------------
def test_constraint_is_zero_when_student_equals_teacher():
    teacher = tiny_bert(0, layers=2)
    student = copy.deepcopy(teacher)
    overparameterize(student)
    term = MPOConstraintLoss(student, teacher, layer_map={0: 0, 1: 1})
    assert len(term.pair_names) == 12
    assert term.regulariser().item() < 1e-12


def test_constraint_pairs_each_block_with_its_origin_and_starts_at_zero():
    """Issue 16.4, the OPDF benchmark's setting: a 3-block student cut from teacher blocks 0, 2, 4 of a 6-block
    teacher. The default map must pair block i with the block it was copied from (not 2i + 1)."""
    teacher = tiny_bert(0, layers=6)
    student = student_from_teacher_layers(teacher, [0, 2, 4])
    overparameterize(student)
    term = MPOConstraintLoss(student, teacher)
    assert term.layer_map == {0: 0, 1: 2, 2: 4}
    assert term.regulariser().item() < 1e-12
    assert MPOConstraintLoss(student, teacher, layer_map=default_layer_map(3, 6)).regulariser().item() > 1e-6


def test_constraint_gradient_reaches_auxiliary_cores_only():
    teacher, student = tiny_bert(0, layers=4), tiny_bert(1, layers=2)
    overparameterize(student)
    term = LOSS_REGISTRY["mpo_constraint"](student, teacher)  # default map: 0 -> 1, 1 -> 3
    assert term.layer_map == {0: 1, 1: 3}
    with torch.no_grad():  # as after some training: the identity middle cores no longer equal the teacher's
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    loss = term.regulariser()
    assert loss.item() > 0 and loss.requires_grad  # unlike the official code: not detached
    loss.backward()
    for layer in mpo_modules(student).values():
        for k, core in enumerate(layer.cores):
            if k == layer.central_index:
                assert core.grad is None
            else:
                assert core.grad is not None and core.grad.abs().sum() > 0


def test_constraint_value_adds_up_over_micro_batches():
    teacher, student = tiny_bert(0, layers=4), tiny_bert(1, layers=2)
    overparameterize(student)
    term = MPOConstraintLoss(student, teacher)
    r = term.regulariser()
    total = 0.0
    for size in (3, 5):  # one optimizer step of 8 examples in two micro-batches
        batch = DistillationBatch(inputs={"input_ids": torch.zeros(size, 4, dtype=torch.long)}, labels=None,
                                  student=None, teacher=None, teacher_logits=None,
                                  n_items=torch.tensor(8.0), n_examples=torch.tensor(8.0))
        total = total + term(batch)
    torch.testing.assert_close(total, r)


def test_constraint_errors():
    teacher, student = tiny_bert(0, layers=4), tiny_bert(1, layers=2)
    with pytest.raises(ValueError, match="no MPOLinear"):
        MPOConstraintLoss(student, teacher)
    overparameterize(student)
    with pytest.raises(ValueError, match="needs the teacher"):
        MPOConstraintLoss(student, None)
    with pytest.raises(ValueError, match="out of range"):
        MPOConstraintLoss(student, teacher, layer_map={0: 4})
    with pytest.raises(ValueError, match="same shape"):
        MPOConstraintLoss(student, tiny_bert(0, layers=4, hidden=16))


def test_distillation_trainer_trains_cores_with_the_constraint(tmp_path):
    teacher = tiny_bert(0, layers=4)
    student = student_from_teacher_layers(teacher, [1, 3])  # OPDF-style init: the constraint starts at 0
    overparameterize(student)
    term = MPOConstraintLoss(student, teacher)
    assert term.regulariser().item() < 1e-12
    before = {n: p.detach().clone() for n, p in student.named_parameters() if ".cores." in n}
    args = DistillationArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=2, report_to=[], use_cpu=True,
        save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0, learning_rate=1e-3,
    )
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=tiny_dataset(16),
                                  loss_terms={"mpo_constraint": (0.1, term)})
    trainer.train()
    logged = [log["loss_mpo_constraint"] for log in trainer.state.log_history if "loss_mpo_constraint" in log]
    assert len(logged) == 2 and logged[0] == pytest.approx(0.0, abs=1e-9) and logged[1] > 0
    after = dict(student.named_parameters())
    assert all(not torch.equal(before[n], after[n]) for n in before)


def test_contract_takes_what_decompose_returns():
    weight = torch.randn(12, 8)
    dec = mpo_decompose(weight, [3, 4], [2, 4])
    torch.testing.assert_close(mpo_contract(dec), mpo_contract(dec.cores))
    torch.testing.assert_close(mpo_contract(dec), weight, rtol=1e-4, atol=1e-5)
