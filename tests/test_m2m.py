"""m2mKD: splitting and re-joining teachers, the hybrid paths and their loss, frozen meta/teacher, clear errors,
assembly into Auto-loadable V-MoE / MiniMoE students, the resumable pipeline and examples/run_m2mkd.py."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from testing_utils import pixels, run_script, tiny_bert, tiny_config, tiny_dataset, tiny_model
from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

from hf_moekd.distillation import DistillationArguments, DistillationTrainer
from hf_moekd.data.images import rotate_images
from hf_moekd.m2mkd.config import M2MConfig
from hf_moekd.m2mkd.modules import Segment, Stitch, assemble, build_meta, module_state, run_segments, split_model
from hf_moekd.m2mkd.path import M2MPath, student_path, teacher_path
from hf_moekd.m2mkd.report import poor_teacher_paths
from hf_moekd.studies.m2mkd import MODULE_FILE, STITCH_PREFIX, M2MArguments, M2MRun, image_configs, run_m2mkd
from hf_moekd.models.minimoe import MiniMoEConfig, MiniMoEForSequenceClassification
from hf_moekd.models.dense_vit import DenseViTForImageClassification
from hf_moekd.models.vmoe import VMoEForImageClassification

LABELS = torch.tensor([0, 4, 9])


def perturbed(model):
    """Noise on every parameter (fresh models have zero biases and unit LayerNorms, which hide wiring mistakes)."""
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model.eval()


def text_batch(n: int = 4):
    rows = tiny_dataset(n=n, seq=10, ragged=True, seed=1)[:]
    return {k: torch.tensor(v) for k, v in rows.items() if k != "labels"}, torch.tensor(rows["labels"])


def bert_teacher(layers: int = 4):
    return perturbed(tiny_bert(seed=0, layers=layers))


def tiny_student(hidden: int = 16, **overrides) -> VMoEForImageClassification:
    torch.manual_seed(1)
    return perturbed(VMoEForImageClassification(tiny_config(True, hidden_size=hidden, num_attention_heads=2,
                                                            moe_layer_frequency=1, **overrides)))


def minimoe_student(bert, hidden: int = 16) -> MiniMoEForSequenceClassification:
    torch.manual_seed(1)
    config = MiniMoEConfig.from_dense(bert.config, hidden_size=hidden, num_attention_heads=2, intermediate_size=32,
                                      num_ffn_experts=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return perturbed(MiniMoEForSequenceClassification(config))


def trainer_for(path: M2MPath, teacher: M2MPath, tmp_path) -> DistillationTrainer:
    args = DistillationArguments(output_dir=str(tmp_path), alpha=0.5, temperature=1.0, use_cpu=True, report_to=[],
                                 learning_rate=1e-3)
    return DistillationTrainer(model=path, args=args, teacher_model=teacher, train_dataset=[{}])


# ---- splitting -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_modules", [1, 2, 4])
@pytest.mark.parametrize("moe", [False, True], ids=["ones", "vmoe"])
def test_split_and_rejoin_image_model_is_exact(moe, num_modules):
    model = perturbed(tiny_model(moe))
    segments = split_model(model, num_modules)
    logits, routers = run_segments(segments, {"pixel_values": pixels()})
    output = model(pixels())
    assert torch.equal(logits, output.logits)
    assert len(routers) == (2 if moe else 0)
    assert segments[0].stem is not None and segments[-1].head is not None
    assert sum(len(s.blocks) for s in segments) == 4


def test_split_and_rejoin_bert_is_exact():
    teacher, (inputs, _) = bert_teacher(), text_batch()
    assert inputs["attention_mask"].min() == 0  # padded rows: the mask must reach every block
    for num_modules in (2, 4):
        assert torch.equal(run_segments(split_model(teacher, num_modules), inputs)[0], teacher(**inputs).logits)


def test_module_state_covers_the_model_and_assembly_round_trips():
    model = tiny_student()
    states = {i: module_state(model, s) for i, s in enumerate(split_model(model, 2))}
    assert not set(states[0]) & set(states[1]) and set(states[0]) | set(states[1]) == set(model.state_dict())
    assert any(k.startswith("vmoe.embeddings.") for k in states[0]) and "classifier.weight" in states[1]
    rebuilt = assemble(VMoEForImageClassification(model.config).eval(), states)
    assert torch.equal(rebuilt(pixels()).logits, model(pixels()).logits)


# ---- the m2mKD loss -------------------------------------------------------------------------------------

def _m2m_losses(teacher, student, inputs, labels, num_modules, tmp_path):
    """(student-path loss, teacher-self loss, teacher-path logits) for every module, via DistillationTrainer."""
    meta = split_model(perturbed(build_meta(teacher, num_modules)), num_modules)
    results = []
    for i in range(num_modules):
        path, reference = student_path(meta, student, i), teacher_path(meta, teacher, i)
        trainer = trainer_for(path.train(), reference, tmp_path)
        # the teacher module substituted on the student side too: the loss of the teacher against itself
        self_path = student_path(meta, teacher, i).train()
        batch = {**inputs, "labels": labels}
        results.append((trainer.compute_loss(path, batch), trainer.compute_loss(self_path, batch),
                        reference(**inputs).logits))
    return results


@pytest.mark.parametrize("kind", ["image", "text"])
def test_m2m_loss_with_the_teacher_module_equals_teacher_self_loss(kind, tmp_path):
    if kind == "image":
        teacher, inputs, labels = perturbed(tiny_model(False)), {"pixel_values": pixels()}, LABELS % 10
    else:
        teacher, (inputs, labels) = bert_teacher(), text_batch()
    student = copy.deepcopy(teacher)  # same width: every stitch is the identity, the paths compute the same
    for loss, self_loss, teacher_logits in _m2m_losses(teacher, student, inputs, labels, 2, tmp_path):
        assert torch.equal(loss, self_loss)
        assert torch.allclose(loss, 0.5 * F.cross_entropy(teacher_logits, labels), atol=1e-6)  # KL = 0


def test_m2m_loss_differs_for_another_module(tmp_path):
    teacher = perturbed(tiny_model(False))
    student = perturbed(copy.deepcopy(teacher))  # same width, other weights
    for loss, self_loss, _ in _m2m_losses(teacher, student, {"pixel_values": pixels()}, LABELS, 2, tmp_path):
        assert not torch.equal(loss, self_loss)


@pytest.mark.parametrize("index", [0, 1])
def test_module_phase_has_no_gate_loss_by_default(index, tmp_path):
    """Issue 29.5: the official module loss (m2mKD deep_incubation/losses.py `m2mKDLoss.forward`) is
    (1 - a) CE + a KL only; `gate_loss=True` keeps the student's load-balancing loss (the former behaviour)."""
    teacher = perturbed(tiny_model(False))
    meta = split_model(perturbed(build_meta(teacher, 2)), 2)
    student = tiny_student(router_aux_loss_coef=0.5, router_jitter=0.0)
    reference = teacher_path(meta, teacher, index)
    inputs, labels = {"pixel_values": pixels()}, LABELS
    batch = {**inputs, "labels": labels}
    losses = {}
    for gate_loss in (False, True):
        path = student_path(meta, student, index, **({"gate_loss": True} if gate_loss else {})).train()
        trainer = trainer_for(path, reference, tmp_path)
        assert ("router_aux" in trainer.loss_terms) == gate_loss
        with torch.no_grad():  # training mode (the distillation loss); no dropout, no router jitter: deterministic
            out, t = path(**inputs), reference(**inputs).logits
            losses[gate_loss] = trainer.compute_loss(path, batch)
            own_loss = F.cross_entropy(out.logits, labels) + gate_loss * 0.5 * out.aux_loss
            assert torch.allclose(path(**batch).loss, own_loss)
        pure_kd = 0.5 * F.cross_entropy(out.logits, labels) + 0.5 * F.kl_div(
            F.log_softmax(out.logits, -1), F.log_softmax(t, -1), reduction="batchmean", log_target=True)
        assert out.aux_loss > 0.1  # a gate loss term would show: 0.5 * aux_loss
        torch.testing.assert_close(losses[gate_loss], pure_kd + gate_loss * 0.5 * out.aux_loss, rtol=1e-5, atol=1e-6)
    assert student.config.router_aux_loss_coef == 0.5  # the student keeps its own setting (fine-tune, saving)


def test_official_recipe_is_the_default():
    """Issue 29.5, kamanphoebe/m2mKD TRAIN-MOE.md: meta model pre-trained from scratch (PT phase, 300 epochs = 3x
    the 100 of a module's m2mKD phase), experts in every student block, no gate loss in the module phase."""
    config, args = M2MConfig(), M2MArguments()
    assert (config.meta_init, config.module_gate_loss) == ("scratch", False)
    assert (args.meta_init, args.module_gate_loss, args.moe_layer_frequency) == ("scratch", False, 1)
    assert args.meta_epochs == 3 * args.module_epochs
    _, student = image_configs(args, 8)
    assert student.moe_layers == list(range(args.num_hidden_layers))
    assert image_configs(M2MArguments(moe_layer_frequency=2), 8)[1].moe_layers == [1, 3, 5, 7]  # the former setting
    teacher = perturbed(tiny_model(False))
    torch.manual_seed(0)
    meta = build_meta(teacher, 2)  # fresh: nothing copied from the teacher
    stem = "dense_vit.embeddings.patch_embeddings.projection.weight"
    assert stem in meta.state_dict() and not torch.equal(meta.state_dict()[stem], teacher.state_dict()[stem])
    torch.manual_seed(0)
    assert torch.equal(meta.state_dict()[stem], build_meta(teacher, 2, init="scratch").state_dict()[stem])
    assert torch.equal(build_meta(teacher, 2, init="teacher").state_dict()[stem], teacher.state_dict()[stem])


def test_teacher_modules_that_do_not_fit_the_meta_model_are_flagged():
    """Measured (issue 29): a meta model from scratch with a teacher trained outside it: teacher paths 4.4, 75.2,
    76.9, 3.4 % (meta model 78.3 %); from the teacher: 83.5-84.2 % (meta 84.3 %)."""
    assert poor_teacher_paths(0.7832, [0.0442, 0.7518, 0.7694, 0.0342]) == [0, 3]
    assert poor_teacher_paths(0.8434, [0.8348, 0.8354, 0.8374, 0.842]) == []


@pytest.mark.parametrize("gate_loss", [False, True])
def test_module_stage_follows_module_gate_loss(gate_loss, tmp_path, monkeypatch):
    """The pipeline's module stage trains the path `module_gate_loss` asks for, and records the setting."""
    args = M2MArguments(**TINY_RUN, module_gate_loss=gate_loss, output_dir=str(tmp_path))
    run = M2MRun(args, progress=False)
    torch.manual_seed(0)
    run.models["teacher"] = DenseViTForImageClassification(run.teacher_config).eval()
    run.models["meta"] = build_meta(run.models["teacher"], args.num_modules).eval().requires_grad_(False)
    seen = []

    def fit(self, model, epochs, seed, teacher=None):
        seen.append((model.gate_loss, model.config.router_aux_loss_coef))
        return {"train_forwards": 0, "train_seconds": 0.0}

    monkeypatch.setattr(M2MRun, "fit", fit)
    record = run.module(0, 0, {}, build=True)
    coef = run.student_config.router_aux_loss_coef
    assert coef > 0 and seen == [(gate_loss, coef if gate_loss else 0.0)]
    assert record["settings"]["module_gate_loss"] is gate_loss


@pytest.mark.parametrize("index", [0, 1])
def test_meta_and_teacher_get_no_gradient_and_are_not_optimised(index, tmp_path):
    teacher = perturbed(tiny_model(False))
    meta_model = build_meta(teacher, 2)
    meta = split_model(meta_model, 2)
    student = tiny_student()
    path, reference = student_path(meta, student, index), teacher_path(meta, teacher, index)
    assert path.pre.is_identity == (index == 0) and path.post.is_identity == (index == 1)
    trainer = trainer_for(path, reference, tmp_path)
    optimised = {id(p) for group in trainer.create_optimizer().param_groups for p in group["params"]}
    trainable = [*path.module.parameters(), *path.pre.parameters(), *path.post.parameters()]
    assert optimised == {id(p) for p in trainable}
    path.train()
    assert path.module.training and not any(m.training for m in [*path.before.modules(), *path.after.modules()])
    trainer.compute_loss(path, {"pixel_values": pixels(), "labels": LABELS}).backward()
    assert all(p.grad is None for p in [*meta_model.parameters(), *teacher.parameters()])
    assert all(p.grad is not None for p in trainable if p.requires_grad)


def test_minimoe_module_in_a_bert_meta_model_trains_and_assembles(tmp_path):
    teacher, (inputs, labels) = bert_teacher(), text_batch()
    student = minimoe_student(teacher)
    meta = split_model(perturbed(build_meta(teacher, 2, init="scratch")), 2)
    states = {}
    for i in range(2):
        path = student_path(meta, student, i).train()
        out = path(**inputs, labels=labels)
        assert out.logits.shape == (4, 3) and out.aux_loss is not None
        out.loss.backward()
        assert path.module.blocks[0].ffn.router.gate.weight.grad is not None
        states[i] = module_state(student, path.module)
    model = assemble(MiniMoEForSequenceClassification(student.config), states).eval()
    model.save_pretrained(tmp_path / "minimoe")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "minimoe").eval()
    assert type(reloaded).__name__ == "MiniMoEForSequenceClassification"
    assert torch.allclose(reloaded(**inputs).logits, student.eval()(**inputs).logits, atol=1e-6)


# ---- clear errors ---------------------------------------------------------------------------------------

def test_shape_mismatches_give_clear_errors():
    teacher = perturbed(tiny_model(False))  # 4 blocks, width 32
    meta = split_model(build_meta(teacher, 2), 2)
    student = tiny_student()  # width 16
    with pytest.raises(ValueError, match=r"pre-stitch maps 32 -> 32: use Stitch\(32, 16\)"):
        M2MPath(meta, Segment(student, 1, 2), Stitch(32, 32), Stitch(16, 16))
    with pytest.raises(ValueError, match=r"post-stitch maps 16 -> 16: use Stitch\(16, 32\)"):
        M2MPath(meta, Segment(student, 0, 2), Stitch(16, 16), Stitch(16, 16))
    with pytest.raises(ValueError, match=r"choose num_modules among \[1, 2, 4\]"):
        split_model(teacher, 3)
    with pytest.raises(ValueError, match="cut both into the same number"):
        M2MPath(meta, Segment(student, 1, 4), Stitch(32, 16), Stitch(16, 32))
    with pytest.raises(ValueError, match="build the meta model from the teacher"):
        teacher_path(meta, student, 0)
    with pytest.raises(ValueError, match="width 16, got 32"):
        Stitch(16, 32)(torch.zeros(1, 2, 32))
    with pytest.raises(ValueError, match="bert module cannot replace a module of a vit meta"):
        student_path(meta, bert_teacher(), 1)
    with pytest.raises(ValueError, match="needs sequence classifiers"):
        split_model(tiny_bert(token=True), 2)
    with pytest.raises(ValueError, match="teacher must be a monolithic dense model"):
        build_meta(student, 2)
    with pytest.raises(ValueError, match="meta init 'bogus' is unknown"):
        build_meta(teacher, 2, init="bogus")
    with pytest.raises(ValueError, match="cannot split a 'gpt2'"):
        from transformers import GPT2Config, GPT2LMHeadModel

        split_model(GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2)), 2)


def test_assembly_errors_name_the_problem():
    model = tiny_student()
    states = {i: module_state(model, s) for i, s in enumerate(split_model(model, 2))}
    with pytest.raises(ValueError, match="do not cover the student"):
        assemble(copy.deepcopy(model), {0: states[0]})
    with pytest.raises(ValueError, match="repeats weights"):
        assemble(copy.deepcopy(model), {0: states[0], 1: {**states[1], **states[0]}})
    wider = tiny_student(hidden=24)
    with pytest.raises(ValueError, match="another student width"):
        assemble(wider, states)


def test_arguments_check_module_counts_and_phases():
    with pytest.raises(ValueError, match=r"student \(num_hidden_layers\) into 4 modules"):
        M2MArguments(num_hidden_layers=6)
    with pytest.raises(ValueError, match=r"teacher \(teacher_layers\) into 4 modules"):
        M2MArguments(teacher_layers=6)
    with pytest.raises(ValueError, match="needs --module_index"):
        M2MArguments(phase="module")
    with pytest.raises(ValueError, match="out of range"):
        M2MArguments(phase="module", module_index=4)
    assert M2MArguments(module_epochs=2, finetune_epochs=3).baseline_epochs == 4 * 2 + 3
    assert M2MArguments(module_epochs=2, finetune_epochs=3, budget="blocks").baseline_epochs == 2 + 3
    with pytest.raises(ValueError, match="budget 'flops' is unknown"):
        M2MArguments(budget="flops")


# ---- the pipeline ---------------------------------------------------------------------------------------

TINY_RUN = dict(max_train_samples=64, max_test_samples=32, teacher_hidden_size=16, teacher_layers=2, teacher_heads=2,
                teacher_intermediate_size=16, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=8, num_experts=2, moe_layer_frequency=1, num_modules=2, teacher_epochs=1,
                meta_epochs=1, module_epochs=1, finetune_epochs=1, batch_size=32)


@pytest.mark.slow
def test_pipeline_budget_assembly_and_resume(tmp_path, monkeypatch):
    args = M2MArguments(**TINY_RUN, output_dir=str(tmp_path))
    report = run_m2mkd(args, progress=False)
    student, baseline = report.student[0]["results"], report.baseline[0]["results"]
    assert student["student_forwards"] == baseline["student_forwards"] == 3 * 64  # 2 modules + fine-tune vs 3 epochs
    assert student["student_block_forwards"] == 2 * 64  # each module runs half of the student's blocks
    assert set(report.summary()["delta_m2mkd_minus_baseline"]) == {"iid", "rotated", "noised"}

    # the saved modules assemble (stitches dropped) into a V-MoE that reloads with the Auto class, same logits
    states = {i: {k: v for k, v in load_file(tmp_path / "seed0" / f"module_{i}" / MODULE_FILE).items()
                  if not k.startswith(STITCH_PREFIX)} for i in range(2)}
    assembled = assemble(VMoEForImageClassification(image_configs(args, 8)[1]), states).eval()
    assembled.save_pretrained(tmp_path / "assembled")
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "assembled").eval()
    assert isinstance(reloaded, VMoEForImageClassification)
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(assembled(x).logits, reloaded(x).logits)
    student_dir = AutoModelForImageClassification.from_pretrained(tmp_path / "seed0" / "student")
    assert isinstance(student_dir, VMoEForImageClassification)

    # a rerun trains nothing; other settings are refused unless asked to retrain
    monkeypatch.setattr(M2MRun, "fit", lambda *a, **k: pytest.fail("a finished stage was retrained"))
    again = run_m2mkd(args, progress=False)
    assert [m["run_id"] for m in again.modules[0]] == [m["run_id"] for m in report.modules[0]]
    with pytest.raises(ValueError, match="module_epochs differ.*--overwrite_output_dir"):
        run_m2mkd(M2MArguments(**{**TINY_RUN, "module_epochs": 2}, output_dir=str(tmp_path)), progress=False)


@pytest.mark.slow
def test_one_process_per_module_skips_finished_modules(tmp_path, monkeypatch):
    base = dict(TINY_RUN, output_dir=str(tmp_path), baseline=False)
    with pytest.raises(FileNotFoundError, match="run the earlier phases first"):
        run_m2mkd(M2MArguments(**base, phase="module", module_index=0), progress=False)
    run_m2mkd(M2MArguments(**base, phase="prepare"), progress=False)
    first = run_m2mkd(M2MArguments(**base, phase="module", module_index=1), progress=False)
    with pytest.raises(FileNotFoundError, match="module_0 is missing"):
        run_m2mkd(M2MArguments(**base, phase="assemble"), progress=False)
    trained = []
    original = M2MRun.module

    def spy(self, index, *a, **k):
        record = original(self, index, *a, **k)
        trained.append((index, record["run_id"]))
        return record

    monkeypatch.setattr(M2MRun, "module", spy)
    report = run_m2mkd(M2MArguments(**base), progress=False)
    assert trained[1] == (1, first.modules[0][0]["run_id"])  # module 1 reused, module 0 trained now
    assert report.student[0]["settings"]["modules"] == [r for _, r in trained]


@pytest.mark.slow
def test_example_script(tmp_path, monkeypatch, capsys):
    assert run_script("run_m2mkd.py", "--help", monkeypatch=monkeypatch) == 0
    assert "--module_index" in capsys.readouterr().out
    flags = [f"--{k}={v}" for k, v in TINY_RUN.items()]
    assert run_script("run_m2mkd.py", *flags, "--output_dir", str(tmp_path), monkeypatch=monkeypatch) == 0
    results = json.loads((tmp_path / "seed0" / "student" / "all_results.json").read_text())
    assert {"iid", "rotated", "noised", "assembled_iid", "model_card"} <= set(results)
    assert run_script("run_m2mkd.py", *flags, "--num_modules=3", "--output_dir", str(tmp_path),
                      monkeypatch=monkeypatch) == 2  # a clear one-line error, exit code 2


def test_rotate_images():
    images = torch.rand(2, 1, 8, 8)
    assert torch.allclose(rotate_images(images, 0.0), images, atol=1e-6)
    assert torch.allclose(rotate_images(images, 90.0), torch.rot90(images, 1, (2, 3)), atol=1e-5)
