"""`hf-moekd` end to end: help texts, distill (summary table, CSV log, TensorBoard, plots), evaluate, gather's
singular-value plot, and one-line errors."""
from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path

import pytest
import torch
from testing_utils import CLI_FAST, TINY_BERT, cli
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig

from hf_moekd.utils.teachers import minilm_path



def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2000


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "no error message"
    return err[-1]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A tiny SST-2-labelled BERT teacher (MiniLM's vocabulary) whose all_results.json records an accuracy."""
    path = tmp_path_factory.mktemp("cli") / "teacher"
    config = BertConfig.from_pretrained(minilm_path())
    config.update({"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 32,
                   "id2label": {0: "negative", 1: "positive"}, "label2id": {"negative": 0, "positive": 1}})
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(path)
    (path / "all_results.json").write_text(json.dumps({"task": "sst2", "eval_accuracy": 0.875}))
    return path


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, teacher, data_dir) -> tuple[Path, str]:
    """A 2-expert MiniMoE student distilled on SST-2 with CSV, TensorBoard and plots on: (output folder, stdout)."""
    out = tmp_path_factory.mktemp("cli") / "student"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = cli("distill", "--task", "sst2", "--data_dir", data_dir, "--output_dir", out, "--teacher_model_name_or_path",
                   teacher, "--student_config_overrides", TINY_BERT, "--moe_experts", "2", "--hidden_loss_weight", "1",
                   "--log_csv", "true", "--plot", "true", "--report_to", "tensorboard", *CLI_FAST)
    assert code == 0
    return out, stdout.getvalue()


@pytest.mark.parametrize("command, expected", [
    ([], "{demo,distill,evaluate,gather,card}"),
    (["distill"], "--teacher_model_name_or_path"),
    (["evaluate"], "--output_file"),
    (["gather"], "--plot_spectra"),
    (["card"], "--model_id"),
    (["demo"], "--kd_epochs"),
])
def test_help(command, expected, capsys):
    assert cli(*command, "--help") == 0
    assert expected in capsys.readouterr().out


@pytest.mark.slow
def test_distill_prints_summary_and_writes_csv_tensorboard_and_plots(distilled):
    out, stdout = distilled
    table = stdout[stdout.index("sst2 (distil)"):]
    assert "| teacher (recorded) |" in table
    row = next(line for line in table.splitlines() if line.startswith("| eval_accuracy"))
    results = json.loads((out / "all_results.json").read_text())
    assert row.split("|")[2].strip() == f"{results['eval_accuracy']:.4f}" and row.split("|")[3].strip() == "0.8750"
    assert "| parameters " in table and "| total time (s) " in table

    with (out / "log_history.csv").open() as f:
        rows = list(csv.DictReader(f))
    terms = {"loss_ce", "loss_logits_kd", "loss_hidden_mse", "loss_router_aux"}
    assert terms <= rows[0].keys() and {"eval_accuracy", "train_runtime"} <= rows[0].keys()
    train_rows = [r for r in rows if r["loss"]]
    # every term is computed (an untrained student differs from its teacher: none is 0)
    assert [r["step"] for r in train_rows] == ["1", "2"] and all(float(r[t]) > 0 for r in train_rows for t in terms)
    assert float(rows[-1]["eval_accuracy"]) == pytest.approx(results["eval_accuracy"])

    assert is_png(out / "loss_terms.png") and is_png(out / "routing_student.png")
    assert not (out / "routing_teacher.png").exists()  # the teacher is dense

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "runs").iterdir()))).Reload()
    assert {f"train/{t}" for t in terms} <= set(events.Tags()["scalars"])


@pytest.mark.slow
def test_evaluate_matches_the_final_evaluation(distilled, data_dir, tmp_path, capsys):
    out, _ = distilled
    results = json.loads((out / "all_results.json").read_text())
    report = tmp_path / "eval.json"
    # --batch_size 8 = the run's per_device_eval_batch_size: the MiniMoE loss includes the load-balancing loss, a
    # per-batch statistic over every token, padding included (official), so other batches give another eval_loss.
    assert cli("evaluate", out, "--task", "sst2", "--data_dir", data_dir, "--max_eval_samples", "16", "--batch_size", "8",
               "--max_seq_length", "32", "--output_file", report, "--plot_routing", tmp_path / "routing.png") == 0
    written = json.loads(report.read_text())
    assert written["split"] == "validation" and written["examples"] == 16
    assert written["metrics"]["eval_accuracy"] == results["eval_accuracy"]
    assert written["metrics"]["eval_loss"] == pytest.approx(results["eval_loss"], rel=1e-4)
    assert f"| eval_accuracy | {results['eval_accuracy']:.4f} |" in " ".join(capsys.readouterr().out.split())
    assert is_png(tmp_path / "routing.png")


def test_gather_plots_singular_values(tmp_path, capsys):
    import transformers as tf

    from hf_moekd.ones import gather_experts

    torch.manual_seed(0)
    moe = tf.MixtralForCausalLM(tf.MixtralConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                 num_key_value_heads=2, intermediate_size=16, num_local_experts=4,
                                                 max_position_embeddings=64))
    moe.save_pretrained(tmp_path / "moe")
    assert cli("gather", tmp_path / "moe", tmp_path / "dense", "--rank", "4", "--plot_spectra", tmp_path / "plots") == 0
    assert is_png(tmp_path / "plots" / "singular_values.png") and (tmp_path / "dense" / "config.json").is_file()
    assert "singular-value spectra written to" in capsys.readouterr().out

    spectra: dict = {}
    gather_experts(moe, "average", spectra=spectra, progress=False)
    experts = moe.model.layers[1].mlp.experts
    assert list(spectra) == ["model.layers.0.mlp", "model.layers.1.mlp"] and set(spectra["model.layers.1.mlp"]) == {"gate", "up", "out"}
    assert spectra["model.layers.1.mlp"]["out"].shape == (4, 16)
    torch.testing.assert_close(spectra["model.layers.1.mlp"]["out"][2], torch.linalg.svdvals(experts.down_proj[2].float()))


@pytest.mark.parametrize("case, expected", [
    ("evaluate_missing_folder", "does not exist"),
    ("evaluate_wrong_labels", "has labels ['negative', 'positive'] but cola has"),
    ("evaluate_wrong_head", "needs a *ForTokenClassification model"),
    ("distill_unknown_task", "Unknown GLUE task 'qnli2'"),
    ("distill_missing_data", "not found"),
])
def test_bad_input_gives_one_line(case, expected, teacher, data_dir, tmp_path, capsys):
    args = {
        "evaluate_missing_folder": ["evaluate", tmp_path / "nothing", "--task", "sst2"],
        "evaluate_wrong_labels": ["evaluate", teacher, "--task", "cola", "--data_dir", data_dir],
        "evaluate_wrong_head": ["evaluate", teacher, "--task", "conll", "--data_dir", data_dir],
        "distill_unknown_task": ["distill", "--task", "qnli2", "--output_dir", tmp_path / "out", *CLI_FAST],
        "distill_missing_data": ["distill", "--task", "rte", "--data_dir", tmp_path / "empty", "--output_dir",
                                 tmp_path / "out", *CLI_FAST],
    }[case]
    assert cli(*args) == 2
    line = error_line(capsys)
    assert line.startswith("error: ") and expected in line, line
    assert not (tmp_path / "out").exists()


def test_fine_tune_mode_leaves_the_validated_arguments_unchanged(tmp_path):
    """Issue 27.2: without a teacher the recipe trains on the labels alone through its own copy of the arguments."""
    from hf_moekd.distillation import DistillationArguments
    from hf_moekd.recipes.common import configure_losses

    args = DistillationArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], alpha=0.7)
    mode, run_args = configure_losses(args)
    assert mode == "fine-tune" and args.alpha == 0.7 and run_args is not args
    assert run_args.loss_weights() == {"ce": 1.0} and args.loss_weights() == {"ce": pytest.approx(0.3), "logits_kd": 0.7}
    teacher = DistillationArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], teacher_model_name_or_path="minilm-l6")
    assert teacher.teacher_model_name_or_path == str(minilm_path())  # the alias is resolved while validating
    assert configure_losses(teacher) == ("distil", teacher)
    with pytest.raises(ValueError, match="Intermediate KD losses need a teacher"):
        configure_losses(DistillationArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], hidden_loss_weight=1.0))
