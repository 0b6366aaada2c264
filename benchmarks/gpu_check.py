#!/usr/bin/env python
"""LM distillation on a CUDA GPU: the fused KD path under fp32 and bf16 autocast, against the unfused one.

The CPU benchmarks (lm_kd_large_vocab.py) cannot run bf16 (about 30x slower there) or vocabulary 262,144 at sequence
1,024; this one needs a CUDA device and refuses to run without one. Student and teacher: the Qwen3-shaped causal LMs
of lm_kd_large_vocab.py (2 layers, hidden 256, tied embeddings), forward KL, T 1, alpha 1, batch 4, AdamW.

* parity: on one batch, fused and unfused `DistillationTrainer.compute_loss` in fp32 give the same loss and student
  gradients (relative difference of the loss, largest relative difference of a parameter's gradient norm);
* memory / speed: `trainer.train()` of `--steps` steps per variant (fused / unfused x fp32 / bf16), the variants
  interleaved over `--repeats` repetitions in one process; peak CUDA memory allocated during training above the
  memory allocated before it (`torch.cuda.max_memory_allocated`), median step time after the first step;
* bf16 training: the fused bf16 loss at the first and the last logged step of a longer run (must fall);
* vocabulary 262,144 at sequence 1,024, fused bf16: its peak memory.

    python benchmarks/gpu_check.py          # on a machine with a CUDA GPU
    python benchmarks/gpu_check.py --smoke  # tiny sizes on the CPU (memory not measured): checks the script runs
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from common import write_result  # noqa: E402
from lm_kd_large_vocab import qwen3, rows, train_args  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

VARIANTS = {"fused_fp32": (True, False), "unfused_fp32": (False, False), "fused_bf16": (True, True),
            "unfused_bf16": (False, True)}


CUDA = torch.cuda.is_available()


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


class Clock(TrainerCallback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self.losses: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        _sync()
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        _sync()
        self.times.append(time.perf_counter() - self.start)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


def trainer(fused: bool, bf16: bool, vocab: int, seq: int, steps: int, tmp: str, clock: Clock | None = None,
            logging_steps: int = 0):
    from hf_moekd import DistillationArguments, DistillationTrainer

    settings = {**train_args(tmp, steps), "use_cpu": not CUDA, "bf16": bf16}  # lm_kd_large_vocab.py's training
    if logging_steps:
        settings.update(logging_strategy="steps", logging_steps=logging_steps)
    args = DistillationArguments(alpha=1.0, temperature=1.0, kd_divergence="forward_kl", fused_lm_kd=fused, **settings)
    return DistillationTrainer(model=qwen3(vocab, seq, 0).train(), teacher_model=qwen3(vocab, seq, 1).eval(), args=args,
                               train_dataset=rows(vocab, seq, 4 * steps), callbacks=[clock] if clock else [])


def parity(vocab: int, seq: int) -> dict[str, float]:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for fused in (True, False):
            t = trainer(fused, False, vocab, seq, 1, tmp)
            batch = next(iter(t.get_train_dataloader()))
            batch = {k: v.to(t.args.device) for k, v in batch.items()}
            model = t.model.to(t.args.device)
            loss = t.compute_loss(model, batch)
            loss.backward()
            out[fused] = (loss.item(), {n: p.grad.norm().item() for n, p in model.named_parameters() if p.grad is not None})
            del t, model
    (lf, gf), (lu, gu) = out[True], out[False]
    return {"loss_fused": lf, "loss_unfused": lu, "loss_rel_diff": abs(lf - lu) / abs(lu),
            "grad_norm_max_rel_diff": max(abs(gf[n] - gu[n]) / max(gu[n], 1e-12) for n in gu)}


def run(name: str, vocab: int, seq: int, steps: int) -> dict[str, float]:
    fused, bf16 = VARIANTS[name]
    clock = Clock()
    with tempfile.TemporaryDirectory() as tmp:
        t = trainer(fused, bf16, vocab, seq, steps, tmp, clock)
        if CUDA:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t.model.to(t.args.device)
        before = torch.cuda.memory_allocated() if CUDA else 0
        t.train()
        peak = torch.cuda.max_memory_allocated() if CUDA else 0
        del t
    return {"training_increase_mib": (peak - before) / 2**20, "peak_mib": peak / 2**20,
            "step_seconds_median": statistics.median(clock.times[1:])}


def _ratio(med: dict, precision: str, key: str) -> float | None:
    unfused = med[f"unfused_{precision}"][key]
    return med[f"fused_{precision}"][key] / unfused if unfused else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--bf16_steps", type=int, default=60)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU; writes no result file")
    a = parser.parse_args()
    if a.smoke:
        a.vocab, a.seq, a.steps, a.repeats, a.bf16_steps = 300, 16, 3, 1, 20
    elif not CUDA:
        raise SystemExit("error: benchmarks/gpu_check.py needs a CUDA GPU (none is visible); run it on a GPU machine, "
                         "or pass --smoke to check the script on the CPU")
    big_vocab, big_seq = (a.vocab, a.seq) if a.smoke else (262144, 1024)

    result = {"parity_fp32": parity(a.vocab, min(a.seq, 512))}
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for rep in range(a.repeats):
        for name in (VARIANTS if rep % 2 == 0 else reversed(list(VARIANTS))):
            runs[name].append(run(name, a.vocab, a.seq, a.steps))
            print(f"[gpu_check] repeat {rep} {name}: {runs[name][-1]}", flush=True)
    med = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in runs.items()}
    clock = Clock()
    with tempfile.TemporaryDirectory() as tmp:
        trainer(True, True, a.vocab, min(a.seq, 512), a.bf16_steps, tmp, clock, logging_steps=10).train()
    big = run("fused_bf16", big_vocab, big_seq, a.steps)
    result.update({
        "runs": runs, "median": med,
        "bf16_fused_training": {"losses_every_10_steps": clock.losses, "seq": 512},
        "vocab_262144_seq_1024_fused_bf16": big,
        "settings": {"vocab": a.vocab, "seq": a.seq, "batch": 4, "steps": a.steps, "repeats": a.repeats},
        "device": torch.cuda.get_device_name(0) if CUDA else "cpu", "torch_cuda": torch.version.cuda,
    })
    result["headline"] = {
        "parity_loss_rel_diff_fp32": result["parity_fp32"]["loss_rel_diff"],
        "parity_grad_norm_max_rel_diff_fp32": result["parity_fp32"]["grad_norm_max_rel_diff"],
        "memory_ratio_fused_vs_unfused_bf16": _ratio(med, "bf16", "training_increase_mib"),
        "memory_ratio_fused_vs_unfused_fp32": _ratio(med, "fp32", "training_increase_mib"),
        "step_time_ratio_fused_vs_unfused_bf16": _ratio(med, "bf16", "step_seconds_median"),
        "bf16_loss_first_last": [clock.losses[0], clock.losses[-1]] if clock.losses else None,
        "vocab_262144_seq_1024_training_increase_mib": big["training_increase_mib"],
    }
    if a.smoke:
        print(result["headline"])
    else:
        write_result("gpu_check", result)


if __name__ == "__main__":
    main()
