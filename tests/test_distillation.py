"""DistillationTrainer: loss terms, exact gradient accumulation, teacher handling, offline KD."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from hf_moekd.distillation import (
    DistillationArguments,
    DistillationTrainer,
    LossTerm,
    precompute_teacher_logits,
    register_loss,
)
from hf_moekd.distillation.losses import (
    AttentionRelationKD,
    DistillationBatch,
    HiddenStateMSE,
    LogitsKD,
    soft_divergence,
    uniform_layer_map,
)
from testing_utils import GradRecorder, assert_same_grads, bert_config, tiny_bert, tiny_dataset


def make_args(tmp_path, **kw) -> DistillationArguments:
    defaults = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=2, report_to=[],
        use_cpu=True, save_strategy="no", logging_steps=1, max_grad_norm=0.0, disable_tqdm=True,
        dataloader_drop_last=False, seed=0,
    )
    defaults.update(kw)
    return DistillationArguments(**defaults)


def first_step_grads(tmp_path, train, teacher, student, **kw) -> dict[str, torch.Tensor]:
    recorder = GradRecorder()
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=make_args(tmp_path, max_steps=1, **kw),
        train_dataset=train, callbacks=[recorder],
    )
    trainer.train()
    return recorder.grads[0]


# ---- loss values -------------------------------------------------------------------------------
def batch_of(dataset, n=8):
    return {k: torch.tensor(dataset[:n][k]) for k in dataset.column_names}


def test_logits_kd_and_ce_match_hand_computed(tmp_path):
    student, teacher = tiny_bert(0), tiny_bert(1)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=make_args(tmp_path, alpha=0.3, temperature=3.0))
    inputs = batch_of(tiny_dataset())
    student.train()
    loss = trainer.compute_loss(student, dict(inputs))
    with torch.no_grad():
        s = student(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        t = teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    kd = F.kl_div(F.log_softmax(s / 3, -1), F.softmax(t / 3, -1), reduction="batchmean") * 9
    ce = F.cross_entropy(s, inputs["labels"])
    torch.testing.assert_close(loss, 0.7 * ce + 0.3 * kd, rtol=1e-5, atol=1e-6)


def test_regression_uses_mse(tmp_path):
    student, teacher = tiny_bert(0, num_labels=1), tiny_bert(1, num_labels=1)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=make_args(tmp_path, alpha=0.5))
    inputs = batch_of(tiny_dataset())
    inputs["labels"] = torch.rand(8)
    student.train()
    loss = trainer.compute_loss(student, dict(inputs))
    with torch.no_grad():
        s = student(input_ids=inputs["input_ids"]).logits.squeeze(-1)
        t = teacher(input_ids=inputs["input_ids"]).logits.squeeze(-1)
    expected = 0.5 * F.mse_loss(s, inputs["labels"]) + 0.5 * F.mse_loss(s, t)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_token_kd_ignores_masked_positions(tmp_path):
    student, teacher = tiny_bert(0, token=True), tiny_bert(1, token=True)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=make_args(tmp_path, alpha=1.0))
    inputs = batch_of(tiny_dataset(token=True, ragged=True))
    student.train()
    base = trainer.compute_loss(student, dict(inputs))
    # Changing the inputs at label -100 positions that are also padding changes nothing; unmasking them does.
    masked = inputs["labels"].eq(-100)
    assert masked.any()
    changed = dict(inputs, input_ids=inputs["input_ids"].masked_fill(masked, 5))
    torch.testing.assert_close(trainer.compute_loss(student, changed), base)
    with torch.no_grad():
        s = student(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        t = teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    keep = ~masked
    expected = F.kl_div(F.log_softmax(s[keep] / 2, -1), F.softmax(t[keep] / 2, -1), reduction="batchmean") * 4
    torch.testing.assert_close(base, expected, rtol=1e-5, atol=1e-6)


def test_relation_and_hidden_terms_vanish_for_identical_models(tmp_path):
    teacher = tiny_bert(1)
    student = copy.deepcopy(teacher)
    args = make_args(tmp_path, alpha=1.0, hidden_loss_weight=1.0, attention_relation_weight=1.0, relation_heads=4,
                     relation_student_source="block")  # the student's own Q/K/V: identical models, identical relations
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args)
    inputs = batch_of(tiny_dataset(ragged=True))
    student.train()
    assert trainer.compute_loss(student, dict(inputs)).item() < 1e-6
    other = DistillationTrainer(model=tiny_bert(3), teacher_model=teacher, args=args)
    other.model.train()
    assert other.compute_loss(other.model, dict(inputs)).item() > 1e-3


def test_hidden_projection_and_uniform_map(tmp_path):
    assert uniform_layer_map(3, 6) == {1: 2, 2: 4, 3: 6}
    teacher, student = tiny_bert(1, hidden=48, layers=4), tiny_bert(0, hidden=32, layers=2)
    args = make_args(tmp_path, hidden_loss_weight=1.0, max_steps=2)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=tiny_dataset())
    projections = trainer.loss_terms["hidden_mse"].projections
    assert set(projections) == {"1", "2"} and projections["1"].weight.shape == (48, 32)
    before = projections["1"].weight.detach().clone()
    trainer.train()
    assert not torch.equal(before, projections["1"].weight), "projection must be trained"
    assert any(k.startswith("loss_hidden_mse") for k in trainer.state.log_history[0])


def test_bad_layer_map_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="hidden_layer_map"):
        make_args(tmp_path, hidden_layer_map="{1: 2")
    args = make_args(tmp_path, hidden_loss_weight=1.0, hidden_layer_map='{"5": 1}')
    with pytest.raises(ValueError, match="out of range"):
        DistillationTrainer(model=tiny_bert(0), teacher_model=tiny_bert(1), args=args)


# ---- gradient accumulation ---------------------------------------------------------------------
@pytest.mark.parametrize("token", [False, True])
def test_gradient_accumulation_matches_one_big_batch(tmp_path, token):
    train = tiny_dataset(n=8, token=token, ragged=True, seed=3)
    teacher = tiny_bert(1, token=token)
    kw = dict(hidden_loss_weight=0.5, attention_relation_weight=0.5, relation_heads=4)
    big = first_step_grads(tmp_path, train, teacher, tiny_bert(0, token=token), per_device_train_batch_size=8, **kw)
    small = first_step_grads(
        tmp_path, train, teacher, tiny_bert(0, token=token),
        per_device_train_batch_size=2, gradient_accumulation_steps=4, **kw,
    )
    assert_same_grads(big, small)


# ---- teacher handling --------------------------------------------------------------------------
def test_teacher_is_frozen_in_eval_mode_and_not_saved(tmp_path):
    teacher = tiny_bert(1)
    teacher.train()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer = DistillationTrainer(
        model=tiny_bert(0), teacher_model=teacher, args=make_args(tmp_path, max_steps=3), train_dataset=tiny_dataset(),
    )
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert next(teacher.parameters()).device == trainer.args.device
    trainer.train()
    assert not trainer.teacher.training
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    trainer.save_model(str(tmp_path / "saved"))
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "saved" / "model.safetensors"))
    assert set(saved) == set(trainer.model.state_dict()) and not any("teacher" in k for k in saved)


def test_compute_loss_uses_the_model_argument(tmp_path):
    trainer = DistillationTrainer(model=tiny_bert(0), teacher_model=tiny_bert(1), args=make_args(tmp_path, alpha=0.0))
    wrapped = tiny_bert(5)  # stands for the DDP/DeepSpeed-wrapped model the Trainer passes in
    wrapped.train()
    inputs = batch_of(tiny_dataset())
    loss = trainer.compute_loss(wrapped, dict(inputs))
    expected = F.cross_entropy(wrapped(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits, inputs["labels"])
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize(
    "teacher_kw, message",
    [(dict(num_labels=5), "5 labels but the student has 3"), (dict(vocab_size=99), "vocabulary")],
)
def test_mismatched_teacher_is_refused_before_training(tmp_path, teacher_kw, message):
    from transformers import BertForSequenceClassification

    cfg = bert_config(**{k: v for k, v in teacher_kw.items() if k == "num_labels"})
    if "vocab_size" in teacher_kw:
        cfg.vocab_size = teacher_kw["vocab_size"]
    with pytest.raises(ValueError, match=message):
        DistillationTrainer(model=tiny_bert(0), teacher_model=BertForSequenceClassification(cfg), args=make_args(tmp_path))


def test_missing_teacher_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DistillationTrainer(model=tiny_bert(0), args=make_args(tmp_path, teacher_model_name_or_path=str(tmp_path / "nope")))
    with pytest.raises(ValueError, match="needs a teacher"):
        DistillationTrainer(model=tiny_bert(0), args=make_args(tmp_path), train_dataset=tiny_dataset())


def test_teacher_loads_from_path(tmp_path):
    teacher = tiny_bert(1)
    teacher.save_pretrained(tmp_path / "teacher")
    args = make_args(tmp_path, teacher_model_name_or_path=str(tmp_path / "teacher"))
    trainer = DistillationTrainer(model=tiny_bert(0), args=args)
    assert type(trainer.teacher).__name__ == "BertForSequenceClassification"
    torch.testing.assert_close(trainer.teacher.classifier.weight, teacher.classifier.weight)


# ---- registry ----------------------------------------------------------------------------------
@register_loss("test_l2_logits")
class L2Logits(LossTerm):
    needs_teacher = False

    def forward(self, batch):
        return batch.per_example((batch.student.logits.float() ** 2).sum())


def test_registered_term_is_used_and_logged(tmp_path):
    args = make_args(tmp_path, alpha=0.0, extra_loss_terms=["test_l2_logits=0.25"])
    trainer = DistillationTrainer(model=tiny_bert(0), args=args, train_dataset=tiny_dataset())
    trainer.train()
    assert "loss_test_l2_logits" in trainer.state.log_history[0]
    with pytest.raises(ValueError, match="Unknown loss term 'nope'"):
        DistillationTrainer(model=tiny_bert(0), args=make_args(tmp_path, alpha=0.0, extra_loss_terms=["nope=1"]))


# ---- offline KD --------------------------------------------------------------------------------
@pytest.mark.parametrize("token", [False, True])
def test_precomputed_logits_give_the_online_loss(tmp_path, token):
    train = tiny_dataset(n=16, token=token, ragged=True)
    teacher = tiny_bert(1, token=token)
    cached = precompute_teacher_logits(teacher, train, batch_size=5, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").iterdir())) == 1
    again = precompute_teacher_logits(teacher, train, cache_dir=tmp_path / "cache")
    assert again[0]["teacher_logits"] == cached[0]["teacher_logits"]

    online = DistillationTrainer(model=tiny_bert(0, token=token), teacher_model=teacher, args=make_args(tmp_path, max_steps=3), train_dataset=train)
    offline = DistillationTrainer(model=tiny_bert(0, token=token), args=make_args(tmp_path, max_steps=3), train_dataset=cached)
    assert offline.teacher is None  # training cannot run the teacher
    online.train()
    offline.train()
    for a, b in zip(online.state.log_history[:3], offline.state.log_history[:3]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    for (name, p), q in zip(online.model.named_parameters(), offline.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_teacher_logits_cache_argument_skips_the_teacher_forward(tmp_path):
    train = tiny_dataset(n=16, ragged=True)
    teacher = tiny_bert(1)
    online = DistillationTrainer(model=tiny_bert(0), teacher_model=teacher, args=make_args(tmp_path, max_steps=3), train_dataset=train)
    online.train()
    cached = DistillationTrainer(model=tiny_bert(0), teacher_model=teacher, train_dataset=train, eval_dataset=train,
                                 args=make_args(tmp_path, max_steps=3, teacher_logits_cache=str(tmp_path / "cache")))
    assert "teacher_logits" in cached.train_dataset.column_names and len(list((tmp_path / "cache").iterdir())) == 1
    calls = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    cached.train()
    assert not calls, "with cached logits, training must not run the teacher"
    for a, b in zip(online.state.log_history[:3], cached.state.log_history[:3]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert cached.evaluate()["eval_loss"] > 0  # the evaluation set has no teacher logits: collated as usual


def test_teacher_cache_key_changes_with_teacher(tmp_path):
    train = tiny_dataset(n=4)
    precompute_teacher_logits(tiny_bert(1), train, cache_dir=tmp_path)
    precompute_teacher_logits(tiny_bert(2), train, cache_dir=tmp_path)
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("teacher-logits-")]) == 2


def test_teacher_cache_written_by_two_runs_at_once(tmp_path):
    """Concurrent runs (benchmarks' --workers) compute the same cache: the later rename finds the folder in place
    and keeps it instead of failing."""
    from hf_moekd.distillation.teacher_outputs import _save_atomically

    first = precompute_teacher_logits(tiny_bert(1), tiny_dataset(n=4))
    target = tmp_path / "teacher-logits-key"
    _save_atomically(first, target, {"teacher": "a"})
    _save_atomically(first, target, {"teacher": "b"})  # the slower writer of the same key
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # no temporary folder left
    assert json.loads((target / "hf_moekd_teacher.json").read_text()) == {"teacher": "a"}
    stray = tmp_path / "other" / "teacher-logits-key"
    stray.mkdir(parents=True)
    (stray / "unrelated.txt").write_text("x")
    with pytest.raises(OSError):  # a folder in the way that is no cache: still an error
        _save_atomically(first, stray, {})
    assert sorted(p.name for p in stray.parent.iterdir()) == [stray.name]


def test_moe_student_keeps_its_load_balancing_loss(tmp_path):
    from hf_moekd.models.minimoe import MiniMoEConfig, MiniMoEForSequenceClassification

    config = MiniMoEConfig.from_dense(bert_config(), num_ffn_experts=4, router_aux_loss_coef=0.05)
    torch.manual_seed(0)
    student = MiniMoEForSequenceClassification(config)
    trainer = DistillationTrainer(model=student, teacher_model=tiny_bert(1), args=make_args(tmp_path, alpha=0.0))
    assert trainer.loss_weights["router_aux"] == 0.05
    inputs = batch_of(tiny_dataset())
    student.train()
    torch.manual_seed(1)
    loss = trainer.compute_loss(student, dict(inputs))
    torch.manual_seed(1)  # same router noise
    out = student(**inputs)
    torch.testing.assert_close(loss, out.loss, rtol=1e-5, atol=1e-6)  # CE + 0.05 * aux, as the model computes it


def test_logits_kd_per_logit_is_the_official_m2mkd_formula(tmp_path):
    """Issue 16.7: m2mKD's DistillationLoss (deep_incubation/losses.py): (1 - a) CE + a * KL_sum * T^2 / numel."""
    teacher, student = tiny_bert(1), tiny_bert(2)
    alpha, T = 0.5, 1.0
    args = make_args(tmp_path, alpha=alpha, temperature=T, extra_loss_terms=[f"logits_kd={alpha},per=logit"])
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args)
    inputs = batch_of(tiny_dataset())
    student.train()  # the distillation loss (tiny_bert has no dropout)
    loss = trainer.compute_loss(student, dict(inputs))
    with torch.no_grad():
        s = student(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        t = teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    kd = F.kl_div(F.log_softmax(s / T, 1), F.log_softmax(t / T, 1), reduction="sum", log_target=True) * T * T / s.numel()
    official = (1 - alpha) * F.cross_entropy(s, inputs["labels"]) + alpha * kd
    torch.testing.assert_close(loss.detach(), official, rtol=1e-5, atol=1e-6)
    per_example = DistillationTrainer(model=student, teacher_model=teacher, args=make_args(tmp_path, alpha=alpha, temperature=T))
    assert per_example.compute_loss(student, dict(inputs)) > loss  # the per-example KL weighs C = 3 times more
    with pytest.raises(ValueError, match="takes no option 'scale'"):
        DistillationTrainer(model=student, teacher_model=teacher,
                            args=make_args(tmp_path, extra_loss_terms=["logits_kd=0.5,scale=2"]))


# ---- loss terms take their own parameters (issue 27.2) -----------------------------------------
def test_loss_terms_are_built_from_explicit_parameters(tmp_path):
    """A term needs no DistillationArguments: its settings are constructor parameters; `from_args` reads them from
    the run's arguments (and options override them)."""
    teacher, student = tiny_bert(1), tiny_bert(2)
    inputs = batch_of(tiny_dataset())
    with torch.no_grad():
        s = student(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        t = teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], output_hidden_states=True)
    n = torch.tensor(float(len(inputs["labels"])))
    batch = DistillationBatch(inputs=inputs, labels=inputs["labels"], student=s, teacher=t, teacher_logits=t.logits,
                              n_items=n, n_examples=n)
    term = LogitsKD(temperature=3.0, divergence="reverse_kl")
    assert not hasattr(term, "args")
    expected = soft_divergence(s.logits, t.logits, 3.0, "reverse_kl").sum() / n
    torch.testing.assert_close(term(batch), expected)

    args = make_args(tmp_path, temperature=3.0, kd_divergence="reverse_kl", jsd_beta=0.2, kd_chunk_size=7)
    built = LogitsKD.from_args(args, student, teacher, per="logit")
    assert (built.temperature, built.divergence, built.beta, built.chunk_size, built.per) == (3.0, "reverse_kl", 0.2, 7,
                                                                                              "logit")
    assert LogitsKD.from_args(args, student, teacher, temperature=1.5).temperature == 1.5  # an option wins
    with pytest.raises(ValueError, match="takes no option 'scale'; its options: temperature, divergence"):
        LogitsKD.from_args(args, student, teacher, scale=2)

    hidden = HiddenStateMSE(student, teacher, layer_map={"2": 2})  # JSON-style keys work too
    assert hidden.layer_map == {2: 2}
    assert HiddenStateMSE.from_args(make_args(tmp_path, hidden_layer_map='{"1": 2}'), student, teacher).layer_map == {1: 2}
    relation = AttentionRelationKD(student, teacher, heads=4, student_source="block")
    assert (relation.heads, relation.source, relation.layers) == (4, "block", {"student": -1, "teacher": -1})
    with pytest.raises(ValueError, match="needs a teacher"):
        AttentionRelationKD(student, None)


def test_a_term_written_for_the_old_signature_gets_one_clear_error(tmp_path):
    class Old(LossTerm):
        name = "old"

        def __init__(self, args, student, teacher):
            super().__init__()

    with pytest.raises(TypeError, match="takes the arguments object"):
        Old.from_args(make_args(tmp_path), tiny_bert(0), None)
