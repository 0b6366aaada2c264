"""The CLI error contract over one table of bad checkpoints: every command that loads weights (`distill` for the
student and the teacher, `evaluate`, `gather`) answers a damaged safetensors file, a missing local folder and a
pickle-only folder with one line on stderr, exit code 2, and no output folder left behind (issue 31.1 and 31.7)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
import transformers as tf

from hf_moekd.utils.teachers import minilm_path
from testing_utils import TINY_BERT, cli

COMMON = ["--save_strategy", "no", "--max_steps", "1", "--per_device_train_batch_size", "4", "--max_seq_length", "16",
          "--report_to", "none", "--disable_tqdm", "true", "--use_cpu", "true"]


def _bert(path: Path) -> Path:
    config = tf.BertConfig.from_pretrained(minilm_path())
    config.update({"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 32,
                   "id2label": {0: "a", 1: "b"}, "label2id": {"a": 0, "b": 1}})
    torch.manual_seed(0)
    tf.AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
    tf.AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(path)
    return path


def _mixtral(path: Path) -> Path:
    torch.manual_seed(0)
    tf.MixtralForCausalLM(tf.MixtralConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                           num_key_value_heads=1, intermediate_size=8, num_local_experts=2,
                                           max_position_embeddings=32)).save_pretrained(path)
    return path


def _damage(folder: Path, how: str) -> Path:
    """`folder` made bad in one way; returns the path to pass on the command line."""
    weights = folder / "model.safetensors"
    good = weights.read_bytes()
    if how == "truncated":  # an interrupted download
        weights.write_bytes(good[: len(good) // 2])
    elif how == "damaged_header":
        weights.write_bytes(good[:8] + b"{not json" + good[17:])
    elif how == "pickle_only":
        from safetensors.torch import load_file

        torch.save(load_file(weights), folder / "pytorch_model.bin")
        weights.unlink()
    elif how == "missing_folder":  # relative, one slash: looks like a Hub id `org/name`, but runs/ is a local folder
        return Path("runs") / "no-such-model"
    return folder


BAD = {"truncated": "model.safetensors", "damaged_header": "model.safetensors", "pickle_only": "pickle weights",
       "missing_folder": "does not exist"}


@pytest.mark.parametrize("command", ["distill_student", "distill_teacher", "evaluate", "gather"])
@pytest.mark.parametrize("how", list(BAD))
def test_bad_checkpoint_is_one_line_exit_2_nothing_left(command, how, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    data = tmp_path / "train.csv"
    pd.DataFrame([{"text": f"word {i} " * (1 + i % 3), "label": "ab"[i % 2]} for i in range(8)]).to_csv(data, index=False)
    out = tmp_path / "out"
    make = _mixtral if command == "gather" else _bert
    bad = _damage(make(tmp_path / "model"), how)
    task = ["--task", "text-classification", "--train_file", data, "--validation_file", data]
    argv = {
        "distill_student": ["distill", *task, "--model_name_or_path", bad, "--output_dir", out, *COMMON],
        "distill_teacher": ["distill", *task, "--student_config_overrides", TINY_BERT, "--teacher_model_name_or_path", bad,
                            "--output_dir", out, *COMMON],
        "evaluate": ["evaluate", bad, "--task", "text-classification", "--validation_file", data],
        "gather": ["gather", bad, out],
    }[command]
    assert cli(*argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1 and BAD[how] in errors[0], err
    assert "Traceback" not in "\n".join(err)
    if how in ("truncated", "damaged_header"):
        assert "truncated or corrupt" in errors[0]
    assert not out.exists()
