"""Issue 29.3: the OPDF decomposition gauge (official symmetric square-root gauge by default, ours as an option) and
the tensor constraint's reduction (the official sum over auxiliary cores by default, the mean as an option)."""
from __future__ import annotations

import math

import pytest
import torch

from hf_moekd.opdf import MPOConfig, MPOConstraintLoss, MPOLinear, mpo_contract, mpo_decompose, mpo_modules, overparameterize
from hf_moekd.model_utils.students import student_from_teacher_layers
from testing_utils import tiny_bert

ROWS, COLS = [4, 1, 1, 1, 6], [8, 1, 1, 1, 4]  # OPDF-style: large outer factors, singleton middle ones


def fixed_matrix() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(24, 32, dtype=torch.float64)


def official_reference(w: torch.Tensor, rows: list[int], cols: list[int]) -> list[torch.Tensor]:
    """The official Matrix2MPO algorithm, written out plainly: left-to-right SVDs, then at every bond k the
    R-factors of the left part (L_k) and of the right part (R_k), SVD L_k R_k = u s v, and the gauge
    q_k = s^-1/2 u^T L_k, p_k = R_k v^T s^-1/2 inserted on the bond."""
    n = len(rows)
    dims = [r * c for r, c in zip(rows, cols)]
    bonds = [min(math.prod(dims[:k]), math.prod(dims[k:])) for k in range(n + 1)]  # the official compute_rank
    res = w.reshape(*rows, *cols).permute([a for k in range(n) for a in (k, n + k)])
    cores = []
    for k in range(n - 1):
        u, s, vh = torch.linalg.svd(res.reshape(bonds[k] * rows[k] * cols[k], -1), full_matrices=False)
        cores.append(u.reshape(bonds[k], rows[k], cols[k], bonds[k + 1]))
        res = s[:, None] * vh
    cores.append(res.reshape(bonds[n - 1], rows[n - 1], cols[n - 1], 1))
    left, right = [None] * n, [None] * n
    _, s, vh = torch.linalg.svd(cores[0].reshape(-1, bonds[1]), full_matrices=False)
    left[1] = s[:, None] * vh
    for k in range(1, n - 1):
        _, s, vh = torch.linalg.svd(torch.tensordot(left[k], cores[k], 1).reshape(-1, bonds[k + 1]), full_matrices=False)
        left[k + 1] = s[:, None] * vh
    for k in range(n - 1, 0, -1):
        mat = cores[k] if k == n - 1 else torch.tensordot(cores[k], right[k + 1], 1)
        u, s, _ = torch.linalg.svd(mat.reshape(bonds[k], -1), full_matrices=False)
        right[k] = u * s
    p, q = [None] * n, [None] * n
    for k in range(1, n):
        u, s, vh = torch.linalg.svd(left[k] @ right[k])
        p[k], q[k] = right[k] @ vh.T / s.sqrt(), (u.T / s.sqrt()[:, None]) @ left[k]
    out = []
    for k in range(n):
        core = cores[k] if k == 0 else torch.tensordot(q[k], cores[k], 1)
        out.append(core if k == n - 1 else torch.tensordot(core, p[k + 1], 1))
    return out


def test_official_gauge_is_the_default_and_reproduces_the_official_core_norms():
    w = fixed_matrix()
    reference = official_reference(w, ROWS, COLS)
    torch.testing.assert_close(mpo_contract(reference), w)  # the reference itself is right
    dec = mpo_decompose(w, ROWS, COLS)
    assert dec.gauge == "official"
    ours = [core.norm().item() for core in dec.cores]
    assert ours == pytest.approx([core.norm().item() for core in reference], abs=1e-6)
    # the outer cores carry the scale (each sqrt of the nuclear norm), the middle ones are identities
    nuclear = torch.linalg.svdvals(w.reshape(4, 1, 1, 1, 6, 8, 1, 1, 1, 4).permute(0, 5, 1, 6, 2, 7, 3, 8, 4, 9)
                                   .reshape(32, 24)).sum()
    assert ours[0] == pytest.approx(nuclear.sqrt().item()) and ours[-1] == pytest.approx(nuclear.sqrt().item())
    for k in (1, 2, 3):
        eye = torch.eye(24, dtype=w.dtype)
        torch.testing.assert_close(dec.cores[k].reshape(24, 24), eye)  # ours: signs fixed, so +identity
        torch.testing.assert_close(reference[k].reshape(24, 24).abs(), eye, atol=1e-8, rtol=0)  # official: +-identity
    torch.testing.assert_close(mpo_contract(dec), w, rtol=0, atol=1e-12)


def test_center_gauge_keeps_all_scale_in_the_central_tensor():
    w = fixed_matrix()
    dec = mpo_decompose(w, ROWS, COLS, gauge="center")
    assert dec.gauge == "center"
    norms = [core.norm().item() for core in dec.cores]
    assert norms == pytest.approx([24 ** 0.5, 24 ** 0.5, w.norm().item(), 24 ** 0.5, 24 ** 0.5])
    outer = dec.cores[0].reshape(-1, 24)
    torch.testing.assert_close(outer.T @ outer, torch.eye(24, dtype=w.dtype))  # orthonormal auxiliary tensors
    torch.testing.assert_close(mpo_contract(dec), w, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape,rows,cols", [((48, 40), [4, 3, 4], [2, 5, 4]), ((16, 16), [2, 2, 2, 2], [2, 2, 2, 2]),
                                             ((30, 12), [5, 1, 6], [3, 1, 4])])
def test_official_gauge_splits_every_bond_symmetrically(shape, rows, cols):
    """At every bond the cores on the left contract to U sqrt(S), those on the right to sqrt(S) V^T."""
    torch.manual_seed(1)
    w = torch.randn(shape, dtype=torch.float64)
    dec = mpo_decompose(w, rows, cols)
    torch.testing.assert_close(mpo_contract(dec), w, rtol=0, atol=1e-12)
    reference = official_reference(w, rows, cols)
    assert [c.norm().item() for c in dec.cores] == pytest.approx([c.norm().item() for c in reference], abs=1e-6)
    for k in range(1, len(rows)):
        left, right = _chain(dec.cores[:k]), _chain(dec.cores[k:])
        left, right = left.reshape(-1, left.shape[-1]), right.reshape(right.shape[0], -1)
        s = torch.linalg.svdvals(left @ right)[:left.shape[1]]
        torch.testing.assert_close(left.T @ left, torch.diag(s))
        torch.testing.assert_close(right @ right.T, torch.diag(s))


def _chain(cores: list[torch.Tensor]) -> torch.Tensor:
    """Cores contracted over their inner bonds (outer bonds kept)."""
    out = cores[0]
    for core in cores[1:]:
        out = torch.tensordot(out, core, 1)
    return out


def test_gauges_agree_on_the_matrix_and_truncation():
    torch.manual_seed(2)
    w = torch.randn(96, 64)
    for bond in (None, 16):
        official, center = (mpo_decompose(w, [12, 1, 8], [8, 1, 8], max_bond=bond, gauge=g) for g in ("official", "center"))
        assert official.bond_dims == center.bond_dims
        assert official.truncation_error == pytest.approx(center.truncation_error)
        torch.testing.assert_close(mpo_contract(official), mpo_contract(center), rtol=1e-4, atol=1e-5)


def test_official_gauge_of_a_rank_deficient_matrix_is_finite_and_exact():
    """The official code divides by sqrt(S) and breaks on zero singular values; here they are left out."""
    torch.manual_seed(3)
    w = torch.randn(24, 2, dtype=torch.float64) @ torch.randn(2, 32, dtype=torch.float64)
    w[:, :8] = 0
    for rows, cols in ((ROWS, COLS), ([4, 3, 2], [2, 4, 4])):
        dec = mpo_decompose(w, rows, cols)
        assert all(torch.isfinite(core).all() for core in dec.cores)
        torch.testing.assert_close(mpo_contract(dec), w, rtol=0, atol=1e-12)


def test_gauge_reaches_the_layers_through_overparameterize_and_the_config():
    model = tiny_bert(0, layers=1)
    overparameterize(model)
    assert {m.gauge for m in mpo_modules(model).values()} == {"official"}
    model = tiny_bert(0, layers=1)
    overparameterize(model, config=MPOConfig(gauge="center"))
    layers = list(mpo_modules(model).values())
    assert {m.gauge for m in layers} == {"center"} and "gauge='center'" in repr(layers[0])
    linear = torch.nn.Linear(32, 24)
    assert MPOLinear.from_linear(linear, ROWS, COLS).gauge == "official"
    with pytest.raises(ValueError, match="not both"):
        overparameterize(tiny_bert(0, layers=1), gauge="center", config=MPOConfig())


def test_bad_gauge_and_reduction_raise_one_clear_line():
    for call in (lambda: mpo_decompose(torch.randn(24, 32), ROWS, COLS, gauge="left"),
                 lambda: MPOConfig(gauge="left"),
                 lambda: overparameterize(tiny_bert(0, layers=1), gauge="left")):
        with pytest.raises(ValueError, match=r"gauge must be one of \['official', 'center'\].*got 'left'") as err:
            call()
        assert "\n" not in str(err.value)
    teacher = tiny_bert(0, layers=2)
    student = student_from_teacher_layers(teacher, [1])
    overparameterize(student)
    with pytest.raises(ValueError, match=r"reduction must be one of \['sum', 'mean'\].*got 'max'") as err:
        MPOConstraintLoss(student, teacher, reduction="max")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("gauge", ["official", "center"])
def test_constraint_sums_over_the_auxiliary_cores_by_default(gauge):
    teacher = tiny_bert(0, layers=4)
    student = student_from_teacher_layers(teacher, [1, 3])
    overparameterize(student, gauge=gauge)
    total, mean = MPOConstraintLoss(student, teacher), MPOConstraintLoss(student, teacher, reduction="mean")
    assert total.reduction == "sum" and total.regulariser().item() < 1e-12  # same gauge on both sides: starts at 0
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    layers = mpo_modules(student).values()
    assert {len(m.cores) for m in layers} == {5} and {tuple(m.auxiliary_indices) for m in layers} == {(0, 1, 3, 4)}
    value = total.regulariser()
    assert value.requires_grad and value.item() > 0
    torch.testing.assert_close(value, 4 * mean.regulariser())


def test_recipe_flag_picks_the_gauge(tmp_path):
    """`--mpo_gauge` of the text recipes (examples/run_glue.py, the OPDF benchmark's `--gauges`) reaches the layers."""
    from transformers import AutoModelForSequenceClassification, HfArgumentParser

    from hf_moekd.recipes.arguments import ModelArguments
    from hf_moekd.recipes.students import build_model

    tiny_bert(0, layers=1).save_pretrained(tmp_path)
    (args,) = HfArgumentParser(ModelArguments).parse_args_into_dataclasses(
        ["--model_name_or_path", str(tmp_path), "--mpo_overparameterize", "true", "--mpo_gauge", "center"])
    assert args.card_facts()["recipe"]["mpo_gauge"] == "center"
    model, _ = build_model(args, AutoModelForSequenceClassification, load_processor=lambda path, config: None)
    assert {m.gauge for m in mpo_modules(model).values()} == {"center"}
