"""PEFT students: LoRA in DistillationTrainer, adapter / merged saving, LoRA on fused MoE experts, bad configs."""
from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel
from transformers import (
    AutoModelForSequenceClassification,
    HfArgumentParser,
    MixtralConfig,
    MixtralForSequenceClassification,
    TrainerCallback,
)

from hf_moekd.distillation import DistillationArguments, DistillationTrainer
from hf_moekd.integrations.peft import load_peft_config, merge_peft, wrap_student
from testing_utils import tiny_bert, tiny_dataset

pytestmark = pytest.mark.filterwarnings("ignore:The peft student.s base model was not loaded")
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def make_args(tmp_path, **kw) -> DistillationArguments:
    defaults = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=3, report_to=[], use_cpu=True,
        save_strategy="no", logging_steps=1, max_grad_norm=0.0, disable_tqdm=True, seed=0, learning_rate=1e-2,
    )
    return DistillationArguments(**{**defaults, **kw})


def lora(**kw) -> LoraConfig:
    return LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"], "task_type": "SEQ_CLS", **kw})


def tiny_mixtral(seed: int) -> MixtralForSequenceClassification:
    torch.manual_seed(seed)
    return MixtralForSequenceClassification(MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64, num_labels=3,
        pad_token_id=0,
    ))


def logits(model, data) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        inputs = {k: torch.tensor(data[k]) for k in ("input_ids", "attention_mask")}
        return model(**inputs).logits


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(before: dict, model) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}


class GradRecorder(TrainerCallback):
    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        self.grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A LoRA BERT student distilled with logits, hidden-state and attention-relation KD (3 steps)."""
    tmp = tmp_path_factory.mktemp("lora")
    data = tiny_dataset(16)
    args = make_args(tmp, peft_config=lora(), hidden_loss_weight=1.0, attention_relation_weight=1.0,
                     relation_heads=4)
    with pytest.warns(UserWarning, match="not loaded from a checkpoint"):  # the adapter alone names no base model
        trainer = DistillationTrainer(model=tiny_bert(0, layers=2), teacher_model=tiny_bert(1, layers=4, hidden=48),
                                      args=args, train_dataset=data)
    before = snapshot(trainer.model)
    trainer.train()
    return trainer, before, data, tmp


def test_lora_student_trains_only_adapters(lora_run):
    trainer, before, _, _ = lora_run
    assert isinstance(trainer.model, PeftModel)
    moved = changed(before, trainer.model)
    assert moved and all("lora_" in n or "modules_to_save" in n for n in moved), moved
    assert {n for n in before if "lora_B" in n} <= moved  # every adapter learned
    logged = [h for h in trainer.state.log_history if "loss_hidden_mse" in h]
    assert logged and all(h["loss_attention_relation"] > 0 and h["loss_hidden_mse"] > 0 for h in logged)


def test_adapter_saved_and_reloaded(lora_run):
    trainer, _, data, tmp = lora_run
    out = tmp / "adapter"
    trainer.save_model(str(out))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in out.iterdir()}
    assert not (out / "config.json").exists() and not (out / "model.safetensors").exists()
    reloaded = PeftModel.from_pretrained(tiny_bert(0, layers=2), str(out))
    torch.testing.assert_close(logits(reloaded, data), logits(trainer.model, data))
    # the saved adapter config trains again when given back (peft saves it with inference_mode=True)
    assert json.loads((out / "adapter_config.json").read_text())["inference_mode"] is True
    assert load_peft_config(out).inference_mode is False


def test_merge_adapters_saves_stock_checkpoint(lora_run):
    trainer, _, data, _ = lora_run
    expected = logits(trainer.model, data)
    trainer.args.merge_adapters = True
    try:
        trainer.save_model()
        trainer.create_model_card()
    finally:
        trainer.args.merge_adapters = False
    out = Path(trainer.args.output_dir)
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    stock = AutoModelForSequenceClassification.from_pretrained(out)
    assert not any("lora" in n for n, _ in stock.named_parameters())
    torch.testing.assert_close(logits(stock, data), expected)
    assert isinstance(trainer.model, PeftModel)  # merged on a copy: the trainer keeps its adapters
    card = (out / "README.md").read_text()
    assert "LORA" in card and "merged into the weights" in card
    trainer.save_model()  # then an adapter into the same folder: the stale stock weights go
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    trainer.create_model_card()
    assert "in the adapter" in (out / "README.md").read_text()


def test_lora_on_fused_moe_experts(tmp_path):
    config = lora(target_modules=[], target_parameters=EXPERTS)
    recorder, data = GradRecorder(), tiny_dataset(16)
    args = make_args(tmp_path, peft_config=config, merge_adapters=True)
    trainer = DistillationTrainer(model=tiny_mixtral(0), teacher_model=tiny_mixtral(1), train_dataset=data, args=args,
                                  callbacks=[recorder])
    before = snapshot(trainer.model)
    trainer.train()
    lora_b = [n for n in recorder.grads[0] if "lora_B" in n]
    assert len(lora_b) == 4 and all(recorder.grads[0][n].abs().sum() > 0 for n in lora_b)
    assert all(g.abs().sum() > 0 for n, g in recorder.grads[-1].items() if "lora_" in n)  # A learns once B != 0
    moved = changed(before, trainer.model)
    assert {n for n in before if "lora_" in n} <= moved
    assert all("lora_" in n or "modules_to_save" in n for n in moved), moved
    expected = logits(trainer.model, data)
    trainer.save_model()
    stock = MixtralForSequenceClassification.from_pretrained(trainer.args.output_dir)
    torch.testing.assert_close(logits(stock, data), expected)


def test_resume_from_adapter_checkpoint(tmp_path):
    data = tiny_dataset(16)

    def run(resume: str | None = None) -> dict[str, torch.Tensor]:
        args = make_args(tmp_path, peft_config=lora(), max_steps=2, save_strategy="steps", save_steps=1)
        trainer = DistillationTrainer(model=tiny_bert(0), teacher_model=tiny_bert(1), train_dataset=data, args=args)
        trainer.train(resume_from_checkpoint=resume)
        return snapshot(trainer.model)

    full = run()
    checkpoint = tmp_path / "out" / "checkpoint-1"
    assert (checkpoint / "adapter_model.safetensors").is_file() and not (checkpoint / "model.safetensors").exists()
    resumed = run(str(checkpoint))
    for name, value in full.items():
        torch.testing.assert_close(resumed[name], value)


def test_gradient_accumulation_unchanged(tmp_path):
    data = tiny_dataset(8)

    def grads(**kw):
        recorder = GradRecorder()
        args = make_args(tmp_path, peft_config=lora(), max_steps=1, **kw)
        trainer = DistillationTrainer(model=tiny_bert(0), teacher_model=tiny_bert(1), train_dataset=data, args=args,
                                      callbacks=[recorder])
        trainer.train()
        return recorder.grads[0]

    one, accumulated = grads(), grads(per_device_train_batch_size=4, gradient_accumulation_steps=2)
    assert one.keys() == accumulated.keys() and one
    for name in one:
        torch.testing.assert_close(accumulated[name], one[name], rtol=1e-4, atol=1e-7)


def test_gather_merges_adapters(tmp_path):
    from hf_moekd.ones import gather_experts

    base_dir = tmp_path / "base"
    tiny_mixtral(0).save_pretrained(base_dir)
    model = wrap_student(MixtralForSequenceClassification.from_pretrained(base_dir),
                         lora(target_modules=["q_proj"], target_parameters=EXPERTS))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    model.save_pretrained(tmp_path / "adapter")
    (base_dir / "vocab.txt").write_text("[PAD]\n")  # a tokenizer file: in the base folder, not the adapter's
    expected = gather_experts(merge_peft(model), strategy="average", progress=False).state_dict()
    from_model = gather_experts(model, strategy="average", progress=False).state_dict()
    from_folder = gather_experts(tmp_path / "adapter", strategy="average", output_dir=tmp_path / "dense",
                                 progress=False).state_dict()
    assert (tmp_path / "dense" / "vocab.txt").read_text() == "[PAD]\n"
    plain = gather_experts(tiny_mixtral(0), strategy="average", progress=False).state_dict()
    assert any(not torch.equal(plain[k], expected[k]) for k in expected)  # the adapters count
    for name, tensor in expected.items():
        torch.testing.assert_close(from_model[name], tensor)
        torch.testing.assert_close(from_folder[name], tensor)


def test_adapter_of_a_student_built_from_overrides_names_no_base():
    """A student built from a changed config is no checkpoint: its adapter names no base model."""
    from hf_moekd.integrations.peft import warn_if_baseless
    from hf_moekd.recipes import ModelArguments, build_model

    overrides = "hidden_size=32,num_hidden_layers=1,num_attention_heads=4,intermediate_size=64"
    model, _ = build_model(ModelArguments(student_config_overrides=overrides), AutoModelForSequenceClassification,
                           num_labels=3)
    wrapped = wrap_student(model, lora())
    assert not wrapped.peft_config["default"].base_model_name_or_path
    with pytest.warns(UserWarning, match="base model was not loaded from a checkpoint"):  # despite the module filter
        warn_if_baseless(wrapped, merge_adapters=False)


def test_peft_config_from_command_line(tmp_path):
    lora().save_pretrained(tmp_path)
    inline = '{"peft_type": "LORA", "r": 2, "target_modules": ["query"]}'
    for value in (tmp_path / "adapter_config.json", tmp_path, inline):
        (args,) = HfArgumentParser(DistillationArguments).parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path / "out"), "--peft_config", str(value), "--report_to", "none"])
        assert isinstance(args.peft_config, LoraConfig) and not args.peft_config.inference_mode
        assert json.loads(args.to_json_string())["peft_config"]["peft_type"] == "LORA"


@pytest.mark.parametrize("content, match", [
    (None, "is not a file"),
    ("{not json", "not valid JSON"),
    ('{"r": 8}', "has no 'peft_type'"),
    ('{"peft_type": "NOPE"}', "unknown peft_type 'NOPE'"),
    ('{"peft_type": "LORA", "rank": 8}', r"LoraConfig has no field\(s\) \['rank'\]"),
    ('{"peft_type": "LORA", "layers_pattern": "layer"}', "is not a valid LoraConfig: When .layers_pattern"),
])
def test_bad_peft_config(tmp_path, content, match):
    path = tmp_path / "adapter_config.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        make_args(tmp_path, peft_config=str(path))


def test_peft_config_that_does_not_fit_the_student(tmp_path):
    with pytest.raises(ValueError, match="does not fit the student BertForSequenceClassification"):
        DistillationTrainer(model=tiny_bert(0), teacher_model=tiny_bert(1),
                            args=make_args(tmp_path, peft_config=lora(target_modules=["no_such_layer"])))


@pytest.mark.slow
def test_run_glue_with_lora(data_dir, tmp_path, monkeypatch):
    from hf_moekd.utils.teachers import minilm_path

    config = tmp_path / "lora.json"
    config.write_text(json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["query", "value"],
                                  "task_type": "SEQ_CLS"}))
    out, teacher = tmp_path / "student", tmp_path / "teacher"
    # a teacher folder that holds its classification head (a base checkpoint's random head is refused)
    AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2).save_pretrained(teacher)
    monkeypatch.setattr(sys, "argv", [
        "run_glue.py", "--task_name", "sst2", "--data_dir", str(data_dir / "glue"), "--output_dir", str(out),
        "--teacher_model_name_or_path", str(teacher), "--peft_config", str(config), "--merge_adapters", "true",
        "--student_config_overrides", "hidden_size=64,num_hidden_layers=2,num_attention_heads=4,intermediate_size=128",
        "--max_train_samples", "16", "--max_eval_samples", "16", "--max_steps", "2", "--per_device_train_batch_size",
        "8", "--max_seq_length", "32", "--save_strategy", "no", "--disable_tqdm", "true", "--report_to", "none",
    ])
    runpy.run_path(str(Path(__file__).resolve().parents[1] / "examples" / "run_glue.py"), run_name="__main__")
    results = json.loads((out / "all_results.json").read_text())
    assert results["run_kind"] == "distil" and "eval_accuracy" in results
    assert results["model_card"]["hyperparameters"]["adapter"].startswith("LORA; r=4")
    assert AutoModelForSequenceClassification.from_pretrained(out).config.hidden_size == 64
