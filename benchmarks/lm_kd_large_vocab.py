#!/usr/bin/env python
"""LM distillation at real vocabularies (issue 30): peak training memory and speed of our fused `DistillationTrainer`
against trl's GKDTrainer (lmbda 0, beta 0: supervised forward KL on the labels' tokens), trl in the `bench` extra.

Student and teacher: Qwen3-shaped causal LMs built from configs (2 layers, hidden 256, 4 heads of 64, 2 KV heads,
tied embeddings as the small Qwen3 checkpoints), different seeds; random token rows, every token real; batch 4,
forward KL, T 1, AdamW, `--steps` steps. Every measurement runs in a fresh process, configurations interleaved over the
repetitions; a thread samples the process's RSS every 5 ms during `trainer.train()`. Memory is the peak RSS above the
RSS just before training ("training increase": activations, logits, gradients and optimizer state; the models and
the Python runtime are before) and the absolute peak. Speed: tokens per second of the steps after the first.

Variants: `ours` (fused linear KD, the default), `ours_unfused` (fused_lm_kd=False: full logits, the path before
issue 30), `ours_cached` (top-64 teacher log-probs cached before training, fused), `trl` (GKDTrainer). trl's
DistillationTrainer (trl.trainer.distillation_trainer, present in trl 1.16) is not run: it trains on prompt/completion
or conversational data it tokenises itself, not on the pre-tokenised rows the other trainers share.

    python benchmarks/lm_kd_large_vocab.py
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import psutil  # noqa: E402
import torch  # noqa: E402
from common import RSSSampler, mean_std, write_result  # noqa: E402

HEADLINE_VOCAB = 151936
# (variant, vocab, seq) of every fresh-process run, in the order of one repetition
MEASURED = [("ours", HEADLINE_VOCAB, 512), ("trl", HEADLINE_VOCAB, 512), ("ours", 8192, 512)]
# once each (a step at vocabulary 151,936 takes 30-40 s on the 2 shared cores of the machine this ran on: the whole
# run is kept under ~25 minutes)
ONCE = [("ours", HEADLINE_VOCAB, 1024), ("ours_cached", HEADLINE_VOCAB, 512), ("ours", 262144, 512),
        ("ours_unfused", HEADLINE_VOCAB, 512), ("trl", 8192, 512)]


def qwen3(vocab: int, seq: int, seed: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    return Qwen3ForCausalLM(Qwen3Config(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                        max_position_embeddings=seq, tie_word_embeddings=True, pad_token_id=0))


def rows(vocab: int, seq: int, n: int):
    from datasets import Dataset

    ids = torch.randint(1, vocab, (n, seq), generator=torch.Generator().manual_seed(0))
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
                              "labels": ids.tolist()}).with_format("torch")


def tokenizer():
    """A tiny word-level tokenizer: trl wants a processing class; the rows are already token ids."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, "[EOS]": 2}, unk_token="[UNK]"))
    return PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


def train_args(tmp: str, steps: int) -> dict:
    return dict(output_dir=tmp, per_device_train_batch_size=4, max_steps=steps, learning_rate=1e-4,
                lr_scheduler_type="constant", weight_decay=0.0, train_sampling_strategy="sequential", report_to=[],
                save_strategy="no", disable_tqdm=True, logging_strategy="no", use_cpu=True, seed=0,
                dataloader_num_workers=0, max_grad_norm=0.0)


def build(variant: str, vocab: int, seq: int, steps: int, tmp: str, callbacks=()):
    from transformers import default_data_collator

    from hf_moekd import DistillationArguments, DistillationTrainer
    from hf_moekd.distillation import precompute_teacher_logits

    teacher, data = qwen3(vocab, seq, 1).eval(), rows(vocab, seq, 4 * steps)
    if variant == "trl":
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        targs = GKDConfig(lmbda=0.0, beta=0.0, seq_kd=False, temperature=1.0, bf16=False, gradient_checkpointing=False,
                          disable_dropout=True, max_length=None, **train_args(tmp, steps))
        return GKDTrainer(model=qwen3(vocab, seq, 0).train(), teacher_model=teacher, args=targs, train_dataset=data,
                          processing_class=tokenizer(), data_collator=default_data_collator, callbacks=list(callbacks))
    if variant == "ours_cached":  # computed once before training, as a user does
        data = precompute_teacher_logits(teacher, data, batch_size=1, top_k=64)
    targs = DistillationArguments(alpha=1.0, temperature=1.0, kd_divergence="forward_kl",
                                  fused_lm_kd=variant != "ours_unfused", **train_args(tmp, steps))
    return DistillationTrainer(model=qwen3(vocab, seq, 0).train(), teacher_model=None if variant == "ours_cached"
                               else teacher, args=targs, train_dataset=data, callbacks=list(callbacks))


def single(a: argparse.Namespace) -> None:
    """One trainer in this (fresh) process: RSS before training, peak RSS during it, step times."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        times: list[float] = []

        def on_step_begin(self, *args, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            self.times.append(time.perf_counter() - self.start)

    clock = Clock()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build(a.variant, a.vocab, a.seq, a.steps, tmp, [clock])
        cache_bytes = None
        if a.variant == "ours_cached":
            table = trainer.train_dataset.data
            tokens = sum(len(r) for r in trainer.train_dataset["input_ids"])
            cache_bytes = sum(table.column(c).nbytes for c in ("teacher_topk_logprobs", "teacher_topk_indices")) / tokens
        before = psutil.Process().memory_info().rss / 2**20
        sampler = RSSSampler()
        sampler.start()
        trainer.train()
        sampler.running = False
        sampler.join()
    tokens_per_step = 4 * (a.seq - 1)  # every token real; the last position of a row predicts nothing
    Path(a.out).write_text(json.dumps({
        "peak_rss_mib": sampler.peak, "before_training_mib": before, "training_increase_mib": sampler.peak - before,
        "step_seconds": clock.times, "tokens_per_s": statistics.median(tokens_per_step / t for t in clock.times[1:]),
        "cache_bytes_per_token": cache_bytes}))


def parity(a: argparse.Namespace) -> None:
    """First-batch loss of ours (fused) and trl's GKDTrainer on the same models and rows, no gradient."""
    from transformers import default_data_collator

    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        out = {}
        for variant in ("ours", "trl"):
            trainer = build(variant, a.vocab, a.seq, 1, tmp)
            batch = default_data_collator([trainer.train_dataset[i] for i in range(4)])
            kwargs = {"num_items_in_batch": batch["labels"][:, 1:].ne(-100).sum()} if variant == "trl" else {}
            out[variant] = float(trainer.compute_loss(trainer.model.train(), dict(batch), **kwargs))
            del trainer
    Path(a.out).write_text(json.dumps(out))


def child(mode: str, variant: str, vocab: int, seq: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "out.json")
        start = time.time()
        subprocess.run([sys.executable, __file__, "--child", mode, "--variant", variant, "--vocab", str(vocab), "--seq",
                        str(seq), "--steps", str(steps), "--out", str(out)], check=True)
        result = json.loads(out.read_text())
        print(f"[lm_kd_large_vocab] {mode} {variant} V={vocab} L={seq}: {time.time() - start:.0f} s "
              f"{ {k: v for k, v in result.items() if k != 'step_seconds'} }", file=sys.stderr, flush=True)
        return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=2, help="interleaved repetitions of the MEASURED configurations")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--child", choices=["train", "parity"], help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, default=HEADLINE_VOCAB, help=argparse.SUPPRESS)
    p.add_argument("--seq", type=int, default=512, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    torch.set_num_threads(2)
    if a.child:
        (single if a.child == "train" else parity)(a)
        return
    try:
        import trl  # noqa: F401
    except ImportError:
        sys.exit("lm_kd_large_vocab: trl is not installed; pip install -c constraints.txt -e '.[bench]'")
    check = child("parity", "both", HEADLINE_VOCAB, 512, 1)
    check["rel_diff"] = abs(check["ours"] - check["trl"]) / abs(check["trl"])
    runs: dict[str, list[dict]] = {}
    for _ in range(a.repeats):  # interleaved, each a fresh process
        for variant, vocab, seq in MEASURED:
            runs.setdefault(f"{variant}/{vocab}/{seq}", []).append(child("train", variant, vocab, seq, a.steps))
    for variant, vocab, seq in ONCE:
        runs.setdefault(f"{variant}/{vocab}/{seq}", []).append(child("train", variant, vocab, seq, a.steps))
    summary = {key: {field: mean_std([r[field] for r in rs]) for field in
                     ("training_increase_mib", "peak_rss_mib", "before_training_mib", "tokens_per_s")}
               for key, rs in runs.items()}
    inc = {key: s["training_increase_mib"]["mean"] for key, s in summary.items()}
    speed = {key: statistics.median(s["tokens_per_s"]["values"]) for key, s in summary.items()}
    ours, trl_key, cached = f"ours/{HEADLINE_VOCAB}/512", f"trl/{HEADLINE_VOCAB}/512", f"ours_cached/{HEADLINE_VOCAB}/512"
    headline = {
        "vocab_size": HEADLINE_VOCAB,
        "memory_ratio_vs_trl": round(inc[ours] / inc[trl_key], 3),
        "memory_growth_seq_512_to_1024": round(inc[f"ours/{HEADLINE_VOCAB}/1024"] / inc[ours] - 1, 3),
        "speed_ratio_vs_trl": round(speed[ours] / speed[trl_key], 3),
        "memory_ratio_vs_trl_cached": round(inc[cached] / inc[trl_key], 3),
        "parity_rel_diff": check["rel_diff"],
        "peak_rss_ratio_vs_trl": round(summary[ours]["peak_rss_mib"]["mean"] / summary[trl_key]["peak_rss_mib"]["mean"], 3),
        "training_increase_mib": {key: round(v) for key, v in inc.items()},
        "goals": {"memory_ratio_vs_trl": "<= 0.2", "memory_growth_seq_512_to_1024": "<= 0.25",
                  "speed_ratio_vs_trl": ">= 1.0", "parity_rel_diff": "<= 1e-5"},
    }
    table = [{"variant": key.split("/")[0], "vocab": int(key.split("/")[1]), "seq": int(key.split("/")[2]),
              "training_increase_mib": round(inc[key]), "peak_rss_mib": round(summary[key]["peak_rss_mib"]["mean"]),
              "tokens_per_s": round(speed[key]), "runs": len(runs[key])} for key in runs]
    from importlib.metadata import version

    write_result("lm_kd_large_vocab", {
        "headline": headline, "table": sorted(table, key=lambda r: (r["variant"], r["vocab"], r["seq"])),
        "parity": check, "summary": summary, "runs": runs, "seeds": {"student": 0, "teacher": 1, "data": 0},
        "cache_bytes_per_token": runs[cached][0]["cache_bytes_per_token"],
        "setup": {"trl": version("trl"), "trl_trainer": "trl.experimental.gkd.GKDTrainer (lmbda 0, beta 0, seq_kd off)",
                  "models": "Qwen3ForCausalLM from config: 2 layers, hidden 256, intermediate 512, 4 heads x 64, "
                            "2 KV heads, tied embeddings; student seed 0, teacher seed 1",
                  "batch_size": 4, "steps": a.steps, "repeats": a.repeats, "measured_interleaved": MEASURED,
                  "measured_once": ONCE, "torch_threads": torch.get_num_threads(),
                  "memory": "peak RSS above the RSS just before trainer.train() (sampled every 5 ms), MiB",
                  "not_run": "trl at sequence 1,024 and vocabulary 262,144 (its full logits, softmaxes and gradient "
                             "would need about twice the 512 run's memory, beyond this shared 24 GB machine); trl's "
                             "DistillationTrainer (needs prompt/completion data it tokenises itself)"},
    })


if __name__ == "__main__":
    main()
