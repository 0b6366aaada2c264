"""Fault injection: interrupted runs resume exactly, NaN losses stop training, bad input gives one-line errors,
pickle checkpoints are refused unless allowed, and hf_moekd never turns on trust_remote_code."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from testing_utils import bert_config, tiny_bert, tiny_dataset
from transformers import BertForSequenceClassification

from hf_moekd.cli import main as cli_main
from hf_moekd.distillation import DistillationArguments, DistillationTrainer, LossTerm
from hf_moekd.recipes import run

HERE = Path(__file__).resolve().parent
PACKAGE = HERE.parent / "hf_moekd"


# ---------------------------------------------------------------------------------------------- resume
def _resume_run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(HERE / "resume_run.py"), str(out), *extra], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("variant", [[], ["--moe_cached"]], ids=["dense", "minimoe_cached_logits"])
def test_killed_run_resumes_to_the_same_weights(tmp_path, variant):
    straight = _resume_run(tmp_path / "straight", *variant)
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = _resume_run(tmp_path / "killed", "--kill_after", "3", *variant)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    checkpoint = tmp_path / "killed" / "checkpoint-3"
    assert (checkpoint / "loss_terms.safetensors").is_file() and not (tmp_path / "killed" / "checkpoint-6").exists()
    cache_files = sorted((tmp_path / "killed").glob("cache/**/*"))
    stamps = {f: f.stat().st_mtime_ns for f in cache_files}
    resumed = _resume_run(tmp_path / "killed", "--resume", str(checkpoint), *variant)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for name in ("model.safetensors", "loss_terms.safetensors"):
        a, b = load_file(tmp_path / "straight" / "final" / name), load_file(tmp_path / "killed" / "final" / name)
        assert a.keys() == b.keys() and len(a) > 0
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}:{key} differs after resuming"  # bitwise on CPU
    if variant:  # the teacher-logits cache written before the kill is reused, not rewritten
        assert cache_files and sorted((tmp_path / "killed").glob("cache/**/*")) == cache_files
        assert {f: f.stat().st_mtime_ns for f in cache_files} == stamps
        assert any(".experts." in key for key in load_file(tmp_path / "killed" / "final" / "model.safetensors"))


def test_resume_refuses_a_checkpoint_without_loss_term_state(tmp_path):
    args = DistillationArguments(output_dir=str(tmp_path), max_steps=2, save_steps=1, report_to=[], use_cpu=True,
                                 per_device_train_batch_size=4, hidden_loss_weight=1.0, disable_tqdm=True)
    trainer = DistillationTrainer(model=tiny_bert(0), teacher_model=tiny_bert(1, hidden=48), args=args,
                                  train_dataset=tiny_dataset(n=8))
    trainer.train()
    (tmp_path / "checkpoint-1" / "loss_terms.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has no loss_terms.safetensors.*hidden_mse"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))


# ---------------------------------------------------------------------------------------------- NaN
class NaNAtStep(LossTerm):
    """Finite until the given call, then NaN (a diverging term)."""

    needs_teacher = False

    def __init__(self, student=None, teacher=None, *, at: int) -> None:
        super().__init__()
        self.at, self.calls = at, 0

    def forward(self, batch):
        self.calls += 1
        scale = float("nan") if self.calls >= self.at else 0.0  # NaN loss and NaN gradients from step `at`
        return batch.student.logits.float().pow(2).mean() * scale


def test_nan_loss_stops_training_naming_the_term_and_step(tmp_path):
    student = tiny_bert(0)
    args = DistillationArguments(output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=4, report_to=[],
                                 use_cpu=True, save_strategy="no", disable_tqdm=True, learning_rate=1e-2, alpha=0.0)
    trainer = DistillationTrainer(model=student, args=args, train_dataset=tiny_dataset(n=20),
                                  loss_terms={"diverging": (1.0, NaNAtStep(at=3))})
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 3 .*diverging=nan") as err:
        trainer.train()
    assert "\n" not in str(err.value)
    assert trainer.state.global_step == 2
    assert all(torch.isfinite(p).all() for p in student.parameters())  # the NaN step never reached the weights


def test_nan_check_can_be_turned_off(tmp_path):
    student = tiny_bert(0)
    args = DistillationArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[],
                                 use_cpu=True, save_strategy="no", disable_tqdm=True, stop_on_nonfinite_loss=False, alpha=0.0)
    trainer = DistillationTrainer(model=student, args=args, train_dataset=tiny_dataset(n=8),
                                  loss_terms={"diverging": (1.0, NaNAtStep(at=1))})
    trainer.train()  # the stock Trainer behaviour: no stop, and the NaN reaches the weights
    assert trainer.state.global_step == 2
    assert not all(torch.isfinite(p).all() for p in student.parameters())


def test_script_runner_prints_one_line_for_a_diverged_run(capsys):
    def diverge():
        raise FloatingPointError("non-finite loss at step 7: logits_kd=nan. Lower the learning rate.")

    with pytest.raises(SystemExit) as exit_:
        run(diverge)
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "error: non-finite loss at step 7: logits_kd=nan. Lower the learning rate.\n"


# ---------------------------------------------------------------------------------------------- safe loading
def _pickle_checkpoint(folder: Path) -> BertForSequenceClassification:
    model = tiny_bert(1)
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return model


def test_pickle_teacher_refused_unless_flag(tmp_path):
    teacher = _pickle_checkpoint(tmp_path / "teacher")
    common = dict(output_dir=str(tmp_path / "out"), teacher_model_name_or_path=str(tmp_path / "teacher"),
                  report_to=[], use_cpu=True, alpha=0.5)
    with pytest.raises(ValueError, match="only pickle weights.*--allow_pickle_checkpoints true"):
        DistillationTrainer(model=tiny_bert(0), args=DistillationArguments(**common))
    trainer = DistillationTrainer(model=tiny_bert(0), args=DistillationArguments(**common, allow_pickle_checkpoints=True))
    torch.testing.assert_close(trainer.teacher.classifier.weight, teacher.classifier.weight)


def test_pickle_student_refused_by_the_example_scripts(tmp_path, data_dir, monkeypatch, capsys):
    from testing_utils import SCRIPT_FAST, run_script

    _pickle_checkpoint(tmp_path / "student")
    code = run_script("run_glue.py", "--task_name", "sst2", "--data_dir", str(data_dir / "glue"), "--output_dir",
                      str(tmp_path / "out"), "--model_name_or_path", str(tmp_path / "student"), *SCRIPT_FAST,
                      monkeypatch=monkeypatch)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and "only pickle weights" in err[-1]
    assert not (tmp_path / "out").exists()


def test_hf_moekd_never_turns_on_trust_remote_code():
    """No call in the package passes trust_remote_code=True (strings and docs may mention it)."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        tokens = [t for t in tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
                  if t.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT)]
        for a, b, c in zip(tokens, tokens[1:], tokens[2:]):
            if a.string == "trust_remote_code" and b.string == "=" and c.string == "True":
                offenders.append(f"{path.name}:{a.start[0]}")
    assert offenders == []


# ---------------------------------------------------------------------------------------------- gathering CLI
def _mixtral_checkpoint(folder: Path):
    from testing_utils import mixtral

    model = mixtral()
    model.save_pretrained(folder)
    return model


def _cli_error(args: list[str], capsys) -> str:
    capsys.readouterr()  # drop what the set-up printed
    with pytest.raises(SystemExit) as exit_:
        cli_main(["gather", *args])
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]  # a progress bar may come before it
    assert exit_.value.code == 2 and last.startswith("error: ") and "Traceback" not in err, err
    return last


def test_gather_cli_one_line_errors(tmp_path, capsys):
    ckpt = tmp_path / "moe"
    _mixtral_checkpoint(ckpt)
    out = str(tmp_path / "out")
    assert "does not exist" in _cli_error([str(tmp_path / "missing"), out], capsys)
    assert "rank" in _cli_error([str(ckpt), out, "--rank", "100000"], capsys)

    llama = tmp_path / "llama"
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=32).save_pretrained(llama)
    (llama / "model.safetensors").write_bytes(b"")
    message = _cli_error([str(llama), out], capsys)
    assert "llama" in message and "mixtral" in message  # names the supported families

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("x")
    assert "overwrite" in _cli_error([str(ckpt), str(taken)], capsys)

    pickled = tmp_path / "pickled"
    model = _mixtral_checkpoint(pickled)
    (pickled / "model.safetensors").unlink()
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    assert "--allow_pickle_checkpoints" in _cli_error([str(pickled), out], capsys)
    assert not Path(out).exists()


def test_gather_cli_corrupt_checkpoints(tmp_path, capsys):
    ckpt = tmp_path / "moe"
    _mixtral_checkpoint(ckpt)
    shard = ckpt / "model.safetensors"
    good = shard.read_bytes()

    shard.write_bytes(good[: len(good) // 2])  # truncated download
    message = _cli_error([str(ckpt), str(tmp_path / "out")], capsys)
    assert "model.safetensors" in message and ("truncated" in message or "corrupt" in message)

    from safetensors.torch import save_file

    shard.write_bytes(good)
    state = load_file(shard)
    missing = next(k for k in state if ".experts." in k)
    del state[missing]
    save_file(state, str(shard), metadata={"format": "pt"})
    message = _cli_error([str(ckpt), str(tmp_path / "out")], capsys)
    assert "expert" in message
    assert not (tmp_path / "out").exists()


def test_interrupted_gathering_leaves_nothing_and_a_rerun_finishes(tmp_path, monkeypatch):
    from hf_moekd.ones import gather as gather_module
    from hf_moekd.ones import gather_experts

    ckpt = tmp_path / "moe"
    _mixtral_checkpoint(ckpt)
    real = gather_module._gather_block
    calls = {"n": 0}

    def crash_on_second_layer(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the job
        return real(*args, **kwargs)

    monkeypatch.setattr(gather_module, "_gather_block", crash_on_second_layer)
    with pytest.raises(KeyboardInterrupt):
        gather_experts(ckpt, "svd", output_dir=tmp_path / "dense", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe"]
    monkeypatch.setattr(gather_module, "_gather_block", real)
    dense = gather_experts(ckpt, "svd", output_dir=tmp_path / "dense", progress=False)
    reference = gather_experts(ckpt, "svd", progress=False)
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(dense.state_dict()[name], tensor, rtol=0, atol=0)
    assert json.loads((tmp_path / "dense" / "config.json").read_text())["model_type"] == "mistral"


def test_mismatched_teacher_refused_before_training(tmp_path):
    args = DistillationArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, alpha=0.5)
    with pytest.raises(ValueError, match="label"):
        DistillationTrainer(model=tiny_bert(0), teacher_model=tiny_bert(1, num_labels=5), args=args)
    config = bert_config()
    config.vocab_size = 99
    other_vocab = BertForSequenceClassification(config)
    with pytest.raises(ValueError, match="vocab"):
        DistillationTrainer(model=tiny_bert(0), teacher_model=other_vocab, args=args)


def test_failed_run_keeps_a_folder_that_holds_checkpoints(tmp_path):
    from hf_moekd.recipes import removed_on_failure

    for name, keep in (("with_checkpoint", True), ("without", False)):
        out = tmp_path / name
        with pytest.raises(FloatingPointError), removed_on_failure(out):
            (out / ("checkpoint-3" if keep else "partial")).mkdir(parents=True)
            raise FloatingPointError("non-finite loss")
        assert out.exists() is keep
