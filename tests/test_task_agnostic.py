"""Stage 1 (task-agnostic relation distillation) on the real corpus, then stage 2 from its output; resume."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForSequenceClassification

from hf_moekd.data.text import load_text_corpus
from hf_moekd.distillation import DistillationArguments
from testing_utils import SCRIPT_FAST, run_script

SMALL = "hidden_size=96,num_hidden_layers=2,num_attention_heads=4,intermediate_size=192"
STAGE1 = ["--max_train_samples", "32", "--per_device_train_batch_size", "8", "--max_seq_length", "32",
          "--disable_tqdm", "true", "--report_to", "none", "--student_config_overrides", SMALL, "--logging_steps", "1"]


def test_corpus_is_deduplicated_train_text_only(data_dir):
    corpus = load_text_corpus(data_dir, ["mrpc", "conll"])
    texts = corpus["text"]
    assert len(texts) == len(set(texts)) and all(t == t.strip() and t for t in texts)
    assert "EU rejects German call to boycott British lamb ." in texts  # CoNLL train, tokens joined
    dev_sentence = "He said the foodservice pie business doesn't fit the company's long-term growth strategy."
    assert dev_sentence not in texts  # MRPC dev
    with pytest.raises(ValueError, match="Unknown corpus sources"):
        load_text_corpus(data_dir, ["sst2", "wiki"])


def test_task_agnostic_turns_off_labels_and_logits(tmp_path):
    args = DistillationArguments(output_dir=str(tmp_path), task_agnostic=True, attention_relation_weight=1.0, alpha=0.5)
    assert args.loss_weights() == {"attention_relation": 1.0}
    with pytest.raises(ValueError, match="no loss term"):
        DistillationArguments(output_dir=str(tmp_path), task_agnostic=True)


@pytest.mark.parametrize("source", ["final_hidden", "block"])
def test_relation_term_alone_trains_every_layer_of_a_minimoe_student(tmp_path, source):
    """Issue 16.2: the official MiniMoE student takes its relations from the final hidden states (an extra attention),
    so every layer's experts and router learn in stage 1; from the last block's own Q/K/V (MiniLMv2), the last
    layer's FFN experts and router get exactly zero gradient."""
    from transformers import BertConfig, BertModel

    from hf_moekd.distillation import DistillationTrainer
    from hf_moekd.models.minimoe import minimoe_from_dense

    torch.manual_seed(0)
    small = dict(vocab_size=50, hidden_size=32, num_attention_heads=4, intermediate_size=48, max_position_embeddings=32,
                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    teacher = BertModel(BertConfig(num_hidden_layers=3, **small)).eval()
    student = minimoe_from_dense(BertModel(BertConfig(num_hidden_layers=2, **small)), num_ffn_experts=2).train()
    args = DistillationArguments(output_dir=str(tmp_path), task_agnostic=True, attention_relation_weight=1.0,
                                 relation_heads=4, relation_student_source=source, report_to=[], use_cpu=True)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args)
    ids = torch.randint(1, 50, (4, 12))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    trainer.compute_loss(student, inputs).backward()
    last = len(student.encoder.layer) - 1
    for i, layer in enumerate(student.encoder.layer):
        grads = [p.grad for p in (*layer.ffn.experts.parameters(), *layer.ffn.router.parameters())]
        reached = all(g is not None and g.abs().sum() > 0 for g in grads)
        assert reached == (source == "final_hidden" or i < last), (source, i)


@pytest.mark.slow
def test_stage1_minimoe_then_stage2(data_dir, tmp_path, monkeypatch):
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    code = run_script("run_task_agnostic.py", "--data_dir", str(data_dir), "--output_dir", str(stage1), "--moe_experts", "2",
                      "--max_steps", "2", "--save_strategy", "no", *STAGE1, monkeypatch=monkeypatch)
    assert code == 0
    results = json.loads((stage1 / "all_results.json").read_text())
    assert results["run_kind"] == "task-agnostic distil" and results["corpus_sentences"] == 32
    base = AutoModel.from_pretrained(stage1)
    assert base.config.model_type == "minimoe" and base.config.num_ffn_experts == 2
    code = run_script("run_glue.py", "--task_name", "rte", "--data_dir", str(data_dir / "glue"), "--output_dir", str(stage2),
                      "--model_name_or_path", str(stage1), *SCRIPT_FAST, monkeypatch=monkeypatch)
    assert code == 0
    model = AutoModelForSequenceClassification.from_pretrained(stage2)
    assert model.config.model_type == "minimoe" and model.config.num_labels == 2
    assert model.config.hidden_size == 96 and model.config.vocab_size == base.config.vocab_size


@pytest.mark.slow
def test_stage1_resume_last_matches_uninterrupted(data_dir, tmp_path, monkeypatch):
    out, reference = tmp_path / "stage1", tmp_path / "reference.safetensors"
    common = ["--data_dir", str(data_dir), "--output_dir", str(out), "--max_steps", "3", "--save_strategy", "steps",
              "--save_steps", "1", "--seed", "3", *STAGE1]
    assert run_script("run_task_agnostic.py", *common, monkeypatch=monkeypatch) == 0
    shutil.copy(out / "model.safetensors", reference)
    for leftover in ("checkpoint-2", "checkpoint-3"):  # as if killed right after the first checkpoint
        shutil.rmtree(out / leftover)
    (out / "model.safetensors").unlink()
    (out / "all_results.json").unlink()
    state_file = out / "checkpoint-1" / "trainer_state.json"  # a marker only a resumed run carries forward
    state = json.loads(state_file.read_text())
    state["log_history"].append({"step": 1, "resume_marker": 1.0})
    state_file.write_text(json.dumps(state))
    assert run_script("run_task_agnostic.py", *common, "--resume_from_checkpoint", "last", monkeypatch=monkeypatch) == 0
    resumed, expected = load_file(out / "model.safetensors"), load_file(reference)
    assert resumed.keys() == expected.keys()
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)
    final_state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert {"step": 1, "resume_marker": 1.0} in final_state["log_history"], "the run did not resume from checkpoint-1"


def test_relation_dropout_on_the_student_relations_as_official(tmp_path):
    """Issue 29.4: the official student drops out its relation probabilities (nn.Dropout(attention_probs_dropout_prob),
    then log(p + 1e-7)); default p = the student's attention dropout, `relation_dropout=0` the earlier exact term."""
    from transformers import BertConfig, BertModel

    from hf_moekd.distillation import DistillationTrainer

    torch.manual_seed(0)
    small = dict(vocab_size=50, hidden_size=32, num_attention_heads=4, intermediate_size=48, max_position_embeddings=32,
                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    teacher = BertModel(BertConfig(num_hidden_layers=3, **small)).eval()
    ids = torch.randint(1, 50, (4, 12))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def trainer(student, **overrides):
        args = DistillationArguments(output_dir=str(tmp_path), task_agnostic=True, attention_relation_weight=1.0,
                                     relation_heads=4, report_to=[], use_cpu=True, **overrides)
        return DistillationTrainer(model=student, teacher_model=teacher, args=args)

    dropping = BertModel(BertConfig(num_hidden_layers=2, **{**small, "attention_probs_dropout_prob": 0.1}))
    assert trainer(dropping).loss_terms["attention_relation"].dropout == 0.1  # default: the student's own
    assert trainer(dropping, relation_dropout=0.0).loss_terms["attention_relation"].dropout == 0.0
    with pytest.raises(ValueError, match="relation_dropout must be in"):
        trainer(dropping, relation_dropout=1.0)

    student = BertModel(BertConfig(num_hidden_layers=2, **small)).train()  # no dropout inside the student itself
    exact = trainer(student, relation_dropout=0.0)
    first, second = (exact.compute_loss(student, inputs).item() for _ in range(2))
    assert first == second
    dropped = trainer(student, relation_dropout=0.3)
    same_qkv = exact.loss_terms["attention_relation"].qkv.state_dict()
    dropped.loss_terms["attention_relation"].qkv.load_state_dict(same_qkv)
    values = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        values.append(dropped.compute_loss(student, inputs).item())
    assert values[0] == values[1] and values[0] != values[2]  # random, reproducible under a seed
    # A dropped probability is read as log(1e-7): the official loss is far above the exact one.
    assert min(values) > first + 1.0
