"""`--task clm` / `--task seq2seq` end to end as a user would run them: a Mixtral teacher -> `hf-moekd gather` -> `hf-moekd distill --task
clm` with the MoE as teacher -> `hf-moekd evaluate` (loss, perplexity) -> the saved folder generates with
`pipeline("text-generation")` and loads with the stock Auto class."""
from __future__ import annotations

import json
import math

import pytest
import torch
import transformers as tf
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from hf_moekd.cli import main

SENTENCES = [f"the {a} {b} sat on the {c} mat ." for a in ("red", "big", "old", "small") for b in ("cat", "dog", "fox")
             for c in ("green", "blue", "flat")]


def tokenizer_for(folder) -> tf.PreTrainedTokenizerFast:
    raw = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]", "[EOS]"]))
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")
    tok.save_pretrained(folder)
    return tok


@pytest.fixture(scope="module")
def lm_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("clm")
    teacher = root / "mixtral"
    tok = tokenizer_for(teacher)
    torch.manual_seed(0)
    config = tf.MixtralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                              max_position_embeddings=64, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    tf.MixtralForCausalLM(config).save_pretrained(teacher)
    (root / "train.txt").write_text("\n".join(SENTENCES[:30]) + "\n")
    (root / "valid.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES[30:]))
    return root


def test_mixtral_gather_distill_evaluate_generate(lm_files, tmp_path, capsys):
    student, out = tmp_path / "mistral", tmp_path / "distilled"
    main(["gather", str(lm_files / "mixtral"), str(student)])
    assert tf.AutoConfig.from_pretrained(student).model_type == "mistral"
    main(["distill", "--task", "clm", "--model_name_or_path", str(student), "--teacher_model_name_or_path",
          str(lm_files / "mixtral"), "--train_file", str(lm_files / "train.txt"), "--validation_file",
          str(lm_files / "valid.jsonl"), "--block_size", "8", "--output_dir", str(out), "--max_steps", "3",
          "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--report_to", "none",
          "--disable_tqdm", "true", "--use_cpu", "true", "--save_strategy", "no"])
    results = json.loads((out / "all_results.json").read_text())
    assert results["task"] == "clm" and results["run_kind"] == "distil"
    assert results["eval_perplexity"] == pytest.approx(math.exp(results["eval_loss"]))
    card = (out / "README.md").read_text()
    assert "pipeline_tag: text-generation" in card and "Knowledge distillation" in card
    capsys.readouterr()
    main(["evaluate", str(out), "--task", "clm", "--validation_file", str(lm_files / "valid.jsonl"), "--block_size", "8",
          "--output_file", str(tmp_path / "metrics.json")])
    printed = capsys.readouterr().out
    metrics = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    assert "eval_perplexity" in printed
    assert metrics["eval_loss"] == pytest.approx(results["eval_loss"], rel=1e-4)
    model = tf.AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "MistralForCausalLM"
    generator = tf.pipeline("text-generation", model=str(out), device="cpu")
    text = generator("the red cat", max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert text.startswith("the red cat") and len(text.split()) > 3


def test_qwen2_moe_gather_then_distill(tmp_path):
    """The same pipeline for Qwen2-MoE (shared expert folded in) -> Qwen2, through the Python API (a word-level test
    tokenizer does not fit Qwen2's own tokenizer class, which AutoTokenizer picks for a qwen2 folder)."""
    from datasets import Dataset

    from hf_moekd import DistillationArguments, DistillationTrainer, gather_experts

    torch.manual_seed(0)
    config = tf.Qwen2MoeConfig(vocab_size=40, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                               shared_expert_intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, max_position_embeddings=64)
    teacher = tf.Qwen2MoeForCausalLM(config).eval()
    student = gather_experts(teacher, "average", progress=False)
    assert type(student).__name__ == "Qwen2ForCausalLM"
    ids = torch.randint(0, 40, (8, 12), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
                              "labels": ids.tolist()})
    args = DistillationArguments(output_dir=str(tmp_path), alpha=0.5, kd_divergence="reverse_kl", max_steps=2,
                                 per_device_train_batch_size=4, report_to=[], use_cpu=True, save_strategy="no",
                                 disable_tqdm=True, logging_steps=1)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss_logits_kd" in h]
    assert logged and all(math.isfinite(h["loss"]) and h["loss_logits_kd"] > 0 for h in logged)


def test_clm_bad_input_is_one_clear_line(lm_files, tmp_path, capsys):
    common = ["distill", "--task", "clm", "--model_name_or_path", str(lm_files / "mixtral"), "--output_dir",
              str(tmp_path / "out"), "--report_to", "none", "--use_cpu", "true"]
    cases = [
        ([], "--task clm needs --validation_file"),
        (["--validation_file", str(tmp_path / "missing.txt")], "missing.txt does not exist"),
        (["--validation_file", str(lm_files / "valid.jsonl"), "--text_column", "body"], "has no column 'body'"),
        (["--validation_file", str(lm_files / "train.txt"), "--block_size", "1"], "--block_size must be >= 2"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit):
            main([*common, *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
        assert not (tmp_path / "out").exists()


def test_switch_gather_distill_seq2seq(tmp_path, capsys):
    """Switch Transformers teacher -> gathered T5 -> `--task seq2seq` with decoder-logit KD from the MoE."""
    teacher, student, out = tmp_path / "switch", tmp_path / "t5", tmp_path / "distilled"
    tok = tokenizer_for(teacher)
    torch.manual_seed(0)
    config = tf.SwitchTransformersConfig(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=32, num_layers=2,
                                         num_decoder_layers=2, num_heads=4, num_experts=4, num_sparse_encoder_layers=1,
                                         num_sparse_decoder_layers=1, expert_capacity=64, dropout_rate=0.0,
                                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                         decoder_start_token_id=tok.pad_token_id)
    tf.SwitchTransformersForConditionalGeneration(config).save_pretrained(teacher)
    pairs = [{"source": s, "target": " ".join(reversed(s.split()))} for s in SENTENCES]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs[:30]))
    (tmp_path / "valid.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs[30:]))
    main(["gather", str(teacher), str(student)])
    assert tf.AutoConfig.from_pretrained(student).model_type == "t5"
    main(["distill", "--task", "seq2seq", "--model_name_or_path", str(student), "--teacher_model_name_or_path",
          str(teacher), "--train_file", str(tmp_path / "train.jsonl"), "--validation_file", str(tmp_path / "valid.jsonl"),
          "--max_seq_length", "16", "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "4",
          "--report_to", "none", "--disable_tqdm", "true", "--use_cpu", "true", "--save_strategy", "no",
          "--logging_steps", "1"])
    results = json.loads((out / "all_results.json").read_text())
    assert results["task"] == "seq2seq" and results["eval_perplexity"] == pytest.approx(math.exp(results["eval_loss"]))
    capsys.readouterr()
    main(["evaluate", str(out), "--task", "seq2seq", "--validation_file", str(tmp_path / "valid.jsonl"),
          "--max_seq_length", "16"])
    assert "eval_perplexity" in capsys.readouterr().out
    assert type(tf.AutoModelForSeq2SeqLM.from_pretrained(out)).__name__ == "T5ForConditionalGeneration"
    with pytest.raises(SystemExit):
        main(["evaluate", str(out), "--task", "clm", "--validation_file", str(tmp_path / "valid.jsonl")])
    assert "needs a causal language model" in capsys.readouterr().err
