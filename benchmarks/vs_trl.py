#!/usr/bin/env python
"""Our `DistillationTrainer` against trl's GKD trainer on the same supervised KD work (trl in the `bench` extra only).

Teacher: a Mixtral-style MoE LM (8 experts, top-2, pre-trained `--teacher_steps` steps here); student: its gathered dense Mistral (`average`);
data: the 109k-sentence corpus (`hf_moekd.data.text.load_text_corpus`), byte-level BPE (8k), blocks of `--block_size`
tokens, each row's tail padded (attention mask 0, label -100) to a random length so that token counts differ per row.
Both trainers: forward KL, temperature 1, AdamW, same learning rate, batch, steps and row order; trl's GKDTrainer with
lmbda 0 (no on-policy generation), beta 0 (forward KL), seq_kd off, no gradient checkpointing, fp32; ours with
alpha 1 (KD only: GKD has no label term).

1. parity: on the same first batch, ours = trl's, both sum_t KL(p_T,t || p_S,t) / N over the N shifted real tokens
   (trl: `generalized_jsd_loss` normalised by the Trainer's `num_items_in_batch`; ours: T^2 = 1) -> |diff| <= 1e-5.
2. speed: tokens/s of ours (online teacher), ours with cached top-k teacher log-probs (k 64) and trl, run
   interleaved one optimizer step at a time (`common.lockstep`); ratios of medians.
3. memory: peak RSS during training of each in its own fresh process (same models and data; sampled every 5 ms),
   ours / trl's; also the increase over the RSS before training.
4. gradient accumulation: the first optimizer step's gradients with batch 8 x 1 accumulation vs 1 x 8, each trainer.

    python benchmarks/vs_trl.py --data_dir ../shared/data
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
from common import DEFAULT_DATA, LockstepClock, RSSSampler, lockstep, write_result  # noqa: E402
from datasets import Dataset  # noqa: E402
from ones_lm import corpus_blocks  # noqa: E402
from transformers import (  # noqa: E402
    MixtralConfig,
    MixtralForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)

from hf_moekd import DistillationArguments, DistillationTrainer, gather_experts  # noqa: E402
from hf_moekd.distillation import precompute_teacher_logits  # noqa: E402


def setup(a: argparse.Namespace):
    """Tokenizer, teacher, a fresh-student factory and the padded training rows (same in every process)."""
    tok, ids, _, _ = corpus_blocks(a.data_dir, 200, a.vocab, a.block_size)
    rows = ids[: a.rows]
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(a.block_size // 4, a.block_size + 1, (len(rows),), generator=g)
    mask = (torch.arange(a.block_size)[None, :] < lengths[:, None]).long()
    input_ids = torch.where(mask.bool(), rows, tok.pad_token_id)
    labels = torch.where(mask.bool(), rows, -100)
    data = Dataset.from_dict({"input_ids": input_ids.tolist(), "attention_mask": mask.tolist(),
                              "labels": labels.tolist()}).with_format("torch")
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=len(tok), hidden_size=a.hidden_size, intermediate_size=2 * a.hidden_size,
                           num_hidden_layers=a.layers, num_attention_heads=4, num_key_value_heads=2,
                           num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=a.block_size,
                           pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
                           tie_word_embeddings=True, sliding_window=None)
    teacher = MixtralForCausalLM(config)
    with tempfile.TemporaryDirectory() as tmp:  # a short pre-training: a teacher with peaked next-token distributions
        Trainer(model=teacher, train_dataset=data, args=TrainingArguments(
            **{**common_args(a, tmp, a.batch_size, steps=a.teacher_steps), "learning_rate": 2e-3,
               "train_sampling_strategy": "random"})).train()
    teacher.eval()
    return tok, teacher, lambda: gather_experts(teacher, "average", progress=False).train(), data


def common_args(a: argparse.Namespace, tmp: str, batch: int, accumulation: int = 1, steps: int | None = None) -> dict:
    return dict(output_dir=tmp, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                max_steps=steps or a.steps, learning_rate=1e-4, lr_scheduler_type="constant", weight_decay=0.0,
                train_sampling_strategy="sequential", report_to=[], save_strategy="no", disable_tqdm=True,
                logging_strategy="no", use_cpu=True, seed=0, dataloader_num_workers=0, max_grad_norm=0.0)


def ours(teacher, student, data, args: dict, callbacks=(), cached: bool = False) -> DistillationTrainer:
    targs = DistillationArguments(alpha=1.0, temperature=1.0, kd_divergence="forward_kl", **args)
    return DistillationTrainer(model=student(), teacher_model=None if cached else teacher, args=targs,
                               train_dataset=data, callbacks=list(callbacks))


def trl(tok, teacher, student, data, args: dict, callbacks=()):
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    targs = GKDConfig(lmbda=0.0, beta=0.0, seq_kd=False, temperature=1.0, bf16=False, gradient_checkpointing=False,
                      disable_dropout=True, max_length=None, **args)
    return GKDTrainer(model=student(), teacher_model=teacher, args=targs, train_dataset=data, processing_class=tok,
                      data_collator=default_data_collator, callbacks=list(callbacks))


def parity(tok, teacher, student, data, a, tmp: str) -> dict:
    batch = default_data_collator([data[i] for i in range(8)])
    n = int(batch["labels"][:, 1:].ne(-100).sum())
    mine = ours(teacher, student, data, common_args(a, tmp, 8))
    theirs = trl(tok, teacher, student, data, common_args(a, tmp, 8))
    with torch.no_grad():
        loss_ours = float(mine.compute_loss(mine.model.train(), dict(batch)))
        loss_trl = float(theirs.compute_loss(theirs.model.train(), dict(batch), num_items_in_batch=torch.tensor(n)))
    return {"ours": loss_ours, "trl": loss_trl, "abs_diff": abs(loss_ours - loss_trl), "tokens": n,
            "formula": "sum over the N shifted real tokens t of KL(softmax(z_T,t) || softmax(z_S,t)) / N, T = 1 "
                       "(ours multiplies by T^2; trl's GKD loss does not, and its compute_loss uses T = 1)"}


class GradientGrab(TrainerCallback):
    """The gradients of the first optimizer step (no clipping), flattened."""

    grads: torch.Tensor | None = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = torch.cat([p.grad.detach().flatten().clone() for p in model.parameters() if p.grad is not None])


def accumulation(tok, teacher, student, data, a, tmp: str) -> dict:
    out = {}
    for name, make in (("ours", lambda args, cb: ours(teacher, student, data, args, cb)),
                       ("trl", lambda args, cb: trl(tok, teacher, student, data, args, cb))):
        grabs = []
        for batch, acc in ((8, 1), (1, 8)):
            grab = GradientGrab()
            make(common_args(a, tmp, batch, acc, steps=1), [grab]).train()
            grabs.append(grab.grads)
        out[name] = {"relative_difference": float((grabs[0] - grabs[1]).norm() / grabs[0].norm())}
    return out


def peak_rss(a: argparse.Namespace, which: str) -> dict:
    """Run one trainer for `--steps` steps in a fresh process; its peak RSS and RSS before training (MiB)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "rss.json")
        subprocess.run([sys.executable, *sys.argv, "--single", which, "--single_out", str(out)], check=True)
        return json.loads(out.read_text())


def single(a: argparse.Namespace) -> None:
    """One trainer in this (fresh) process: RSS before training and its peak during training (the teacher's cached
    outputs are computed before, as a user computes them once)."""
    tok, teacher, student, data = setup(a)
    with tempfile.TemporaryDirectory() as tmp:
        if a.single == "ours_cached":
            data = precompute_teacher_logits(teacher, data, batch_size=8, top_k=64)
        args = common_args(a, tmp, a.batch_size)
        trainer = trl(tok, teacher, student, data, args) if a.single == "trl" else \
            ours(teacher, student, data, args, cached=a.single == "ours_cached")
        before = psutil.Process().memory_info().rss / 2**20
        sampler = RSSSampler()
        sampler.start()
        trainer.train()
        sampler.running = False
        sampler.join()
    Path(a.single_out).write_text(json.dumps({"peak_rss_mib": sampler.peak, "before_training_mib": before,
                                              "training_increase_mib": sampler.peak - before}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default=str(DEFAULT_DATA))
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--block_size", type=int, default=128)
    p.add_argument("--hidden_size", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--steps", type=int, default=20, help="measured optimizer steps per trainer (after --warmup)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--teacher_steps", type=int, default=100, help="the teacher's own pre-training steps (CE)")
    p.add_argument("--single", choices=["ours", "ours_cached", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--single_out", help=argparse.SUPPRESS)
    a = p.parse_args()
    torch.set_num_threads(2)
    try:
        import trl as _trl  # noqa: F401
    except ImportError:
        sys.exit("vs_trl: trl is not installed; install the bench extra: pip install -c constraints.txt -e '.[bench]'")
    if a.single:
        single(a)
        return
    tok, teacher, student, data = setup(a)
    cached = precompute_teacher_logits(teacher, data, batch_size=8, top_k=64)
    with tempfile.TemporaryDirectory() as tmp:
        check = parity(tok, teacher, student, data, a, tmp)
        print(f"[vs_trl] parity: {check}", file=sys.stderr, flush=True)
        grads = accumulation(tok, teacher, student, data, a, tmp)
        print(f"[vs_trl] accumulation: {grads}", file=sys.stderr, flush=True)
        steps = a.steps + a.warmup
        tokens = [int(data[i * a.batch_size:(i + 1) * a.batch_size]["labels"][:, 1:].ne(-100).sum())
                  for i in range(steps)]
        run = lambda make: lambda clock: make(common_args(a, tmp, a.batch_size, steps=steps), [clock]).train()  # noqa: E731
        times = lockstep({
            "ours": run(lambda args, cb: ours(teacher, student, data, args, cb)),
            "ours_cached_top64": run(lambda args, cb: ours(teacher, student, cached, args, cb, cached=True)),
            "trl": run(lambda args, cb: trl(tok, teacher, student, data, args, cb)),
        })
    speed = {name: statistics.median(n / s for n, s in zip(tokens[a.warmup:], t[a.warmup:])) for name, t in times.items()}
    memory = {name: peak_rss(a, name) for name in ("ours", "ours_cached", "trl")}
    headline = {
        "speed_ratio": round(speed["ours"] / speed["trl"], 3),
        "memory_ratio": round(memory["ours"]["peak_rss_mib"] / memory["trl"]["peak_rss_mib"], 3),
        "speed_ratio_cached": round(speed["ours_cached_top64"] / speed["trl"], 3),
        "memory_ratio_cached": round(memory["ours_cached"]["peak_rss_mib"] / memory["trl"]["peak_rss_mib"], 3),
        "training_increase_mib": {k: round(v["training_increase_mib"]) for k, v in memory.items()},
        "parity_abs_diff": check["abs_diff"],
        "grad_accumulation_rel_diff": {k: v["relative_difference"] for k, v in grads.items()},
        "targets": {"speed_ratio": ">= 1.0", "memory_ratio": "<= 1.0", "parity_abs_diff": "<= 1e-5"},
    }
    from importlib.metadata import version

    write_result("vs_trl", {
        "headline": headline, "parity": check, "accumulation": grads, "tokens_per_s": speed, "step_times": times,
        "peak_rss": memory, "seeds": [0],
        "setup": {"trl": version("trl"), "trl_trainer": "trl.experimental.gkd.GKDTrainer (lmbda 0, beta 0)",
                  "teacher": f"Mixtral {a.layers} layers, hidden {a.hidden_size}, 8 experts top-2, {a.teacher_steps} CE steps",
                  "student": "gathered Mistral (average)", "batch_size": a.batch_size, "block_size": a.block_size,
                  "steps": a.steps, "warmup": a.warmup, "vocab": a.vocab, "torch_threads": torch.get_num_threads()},
    })


if __name__ == "__main__":
    main()
