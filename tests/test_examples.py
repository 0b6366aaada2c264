"""The example scripts end to end on real data (a few steps), and their handling of bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from testing_utils import SCRIPT_FAST, run_script
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer, BertConfig

from hf_moekd.data.text import load_glue
from hf_moekd.utils.teachers import minilm_path

@pytest.fixture(scope="module")
def glue_teacher(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("glue") / "teacher"
    with pytest.MonkeyPatch.context() as mp:
        code = run_script("run_glue.py", "--task_name", "sst2", "--data_dir", str(data_dir / "glue"), "--output_dir",
                          str(out), *SCRIPT_FAST, monkeypatch=mp)
    assert code == 0
    return out


@pytest.mark.slow
def test_glue_teacher_then_student(glue_teacher, data_dir, tmp_path, monkeypatch):
    results = json.loads((glue_teacher / "all_results.json").read_text())
    assert results["run_kind"] == "fine-tune"
    teacher = AutoModelForSequenceClassification.from_pretrained(glue_teacher).eval()
    tokenizer = AutoTokenizer.from_pretrained(glue_teacher)
    validation = load_glue("sst2", data_dir / "glue")["validation"].select(range(16))  # --max_eval_samples 16
    inputs = tokenizer(list(validation["sentence1"]), truncation=True, max_length=32, padding=True, return_tensors="pt")
    with torch.no_grad():  # the recorded accuracy is the saved teacher's on those 16 sentences
        correct = int((teacher(**inputs).logits.argmax(-1) == torch.tensor(list(validation["label"]))).sum())
    assert results["eval_accuracy"] == pytest.approx(correct / 16)
    out = tmp_path / "student"
    code = run_script(
        "run_glue.py", "--task_name", "sst2", "--data_dir", str(data_dir / "glue"), "--output_dir", str(out),
        "--teacher_model_name_or_path", str(glue_teacher), "--student_layers", "0,2,4",
        "--hidden_loss_weight", "1", "--attention_relation_weight", "1", "--logging_steps", "1", *SCRIPT_FAST,
        monkeypatch=monkeypatch,
    )
    assert code == 0
    student = AutoModelForSequenceClassification.from_pretrained(out)
    assert student.config.num_hidden_layers == 3 and student.config.id2label == {0: "negative", 1: "positive"}
    AutoTokenizer.from_pretrained(out)
    assert json.loads((out / "all_results.json").read_text())["run_kind"] == "distil"


@pytest.mark.slow
def test_small_random_student_on_stsb(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "stsb"
    code = run_script(
        "run_glue.py", "--task_name", "stsb", "--data_dir", str(data_dir / "glue"), "--output_dir", str(out),
        "--student_config_overrides", "hidden_size=96,num_hidden_layers=2,num_attention_heads=4,intermediate_size=192",
        *SCRIPT_FAST, monkeypatch=monkeypatch,
    )
    assert code == 0
    results = json.loads((out / "all_results.json").read_text())
    assert {"eval_pearson", "eval_spearmanr"} <= results.keys()
    assert AutoModelForSequenceClassification.from_pretrained(out).config.hidden_size == 96


@pytest.mark.slow
def test_conll_teacher_and_student(data_dir, tmp_path, monkeypatch):
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    common = ["--data_dir", str(data_dir / "conll2003"), *SCRIPT_FAST]
    assert run_script("run_conll.py", "--output_dir", str(teacher), *common, monkeypatch=monkeypatch) == 0
    assert run_script("run_conll.py", "--output_dir", str(student), "--teacher_model_name_or_path", str(teacher),
                      "--student_layers", "0,5", "--hidden_loss_weight", "1", *common, monkeypatch=monkeypatch) == 0
    results = json.loads((student / "all_results.json").read_text())
    assert {"eval_f1", "test_f1"} <= results.keys()
    assert AutoModelForTokenClassification.from_pretrained(student).config.num_labels == 9


def test_align_labels():
    from hf_moekd.recipes.tasks import align_labels

    assert align_labels([None, 0, 0, 1, None], [3, 4]) == [-100, 3, -100, 4, -100]


def mismatched_teacher(tmp_path: Path) -> Path:
    """A saved 3-label teacher with MiniLM's vocabulary: wrong label count for SST-2."""
    config = BertConfig.from_pretrained(minilm_path())
    config.update({"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 32, "num_labels": 3})
    path = tmp_path / "bad-teacher"
    AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing_data", "not found"),
        ("unknown_task", "Unknown GLUE task"),
        ("label_mismatch", "3 labels but the student has 2"),
        ("missing_teacher", "does not exist"),
        ("existing_output", "exists and is not empty"),
    ],
)
def test_bad_input_gives_one_line_and_no_output(case, expected, data_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    task, glue = "sst2", str(data_dir / "glue")
    extra: list[str] = []
    if case == "missing_data":
        glue = str(tmp_path / "empty")
    elif case == "unknown_task":
        task = "qnli2"
    elif case == "label_mismatch":
        extra = ["--teacher_model_name_or_path", str(mismatched_teacher(tmp_path))]
    elif case == "missing_teacher":
        extra = ["--teacher_model_name_or_path", str(tmp_path / "no-such-teacher")]
    elif case == "existing_output":
        out.mkdir()
        (out / "keep.txt").write_text("user file")
    code = run_script("run_glue.py", "--task_name", task, "--data_dir", glue, "--output_dir", str(out), *extra,
                      *SCRIPT_FAST, monkeypatch=monkeypatch)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("error: ") and expected.lower() in err[-1].lower(), err[-1]
    if case == "existing_output":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not out.exists(), "a failed run must not leave an output directory"


@pytest.mark.slow
@pytest.mark.parametrize("student_flags, expected_type", [(["--moe_experts", "2"], "minimoe"), (["--mpo_overparameterize", "true"], "bert")])
def test_moe_and_mpo_students_save_loadable_checkpoints(student_flags, expected_type, glue_teacher, data_dir, tmp_path, monkeypatch):
    out = tmp_path / "student"
    code = run_script(
        "run_glue.py", "--task_name", "sst2", "--data_dir", str(data_dir / "glue"), "--output_dir", str(out),
        "--teacher_model_name_or_path", str(glue_teacher), "--student_layers", "0,5", *student_flags, *SCRIPT_FAST,
        monkeypatch=monkeypatch,
    )
    assert code == 0
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.model_type == expected_type and model.config.num_hidden_layers == 2
    if expected_type == "bert":  # MPO cores were contracted: a stock BERT checkpoint
        from safetensors import safe_open

        with safe_open(str(out / "model.safetensors"), "pt") as f:
            assert not any("cores" in k for k in f.keys())
