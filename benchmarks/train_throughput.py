#!/usr/bin/env python
"""Training throughput of the studies' distillation step: padding fitted to the data against padding to a fixed length.

A 3-layer student (all-MiniLM-L6-v2's blocks 0,2,4) distilled online from all-MiniLM-L6-v2 on SST-2 training
sentences, batch 32, with the collation settings a user can pick:
  pad_128         every batch padded to 128 tokens (run_glue.py --pad_to_max_length with --max_seq_length 128)
  pad_fitted      padded to a --max_seq_length read off the data (the 99.9th percentile of the tokenized lengths)
  dynamic         padded to the longest sentence of each batch (DataCollatorWithPadding: the recipes' default)
  dynamic_grouped dynamic padding with train_sampling_strategy="group_by_length" (batches of similar lengths)
The four run interleaved one optimizer step at a time (`common.lockstep`); throughput counts real tokens (attention
mask) per second of step time, medians after warm-up. Headline: speed-up of each over pad_128.

    python benchmarks/train_throughput.py --data_dir ../shared/data
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import DEFAULT_DATA, LockstepClock, lockstep, write_result  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding  # noqa: E402

from hf_moekd.data.text import load_glue  # noqa: E402
from hf_moekd.distillation import DistillationArguments, DistillationTrainer  # noqa: E402
from hf_moekd.model_utils.students import student_from_teacher_layers  # noqa: E402
from hf_moekd.utils.teachers import minilm_path  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=str(DEFAULT_DATA), help="folder holding glue/")
    parser.add_argument("--steps", type=int, default=30, help="measured optimizer steps per setting")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=32)
    a = parser.parse_args()

    torch.manual_seed(0)
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    train = load_glue("sst2", Path(a.data_dir) / "glue")["train"].shuffle(seed=0)
    lengths = np.array([len(ids) for ids in tokenizer(list(train["sentence1"]))["input_ids"]])
    fitted = int(np.percentile(lengths, 99.9))
    steps = a.steps + a.warmup
    rows = train.select(range(a.batch_size * steps * 4))  # group_by_length sorts within mega-batches of 50 batches

    def encoded(pad_to: int | None):
        enc = rows.map(lambda b: tokenizer(b["sentence1"], truncation=True, max_length=pad_to or 128,
                                           padding="max_length" if pad_to else False),
                       batched=True, remove_columns=["sentence1", "idx"] if "idx" in rows.column_names else ["sentence1"])
        return enc.rename_column("label", "labels")

    teacher = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    settings = {"pad_128": (encoded(128), False), f"pad_fitted_{fitted}": (encoded(fitted), False),
                "dynamic": (encoded(None), False), "dynamic_grouped": (encoded(None), True)}
    tokens: dict[str, list[int]] = {name: [] for name in settings}

    def run(name: str, data, grouped: bool, tmp: str):
        def go(clock: LockstepClock) -> None:
            torch.manual_seed(0)
            student = student_from_teacher_layers(teacher, [0, 2, 4]).train()
            args = DistillationArguments(output_dir=f"{tmp}/{name}", alpha=0.5, temperature=2.0, max_steps=steps,
                                         per_device_train_batch_size=a.batch_size,
                                         train_sampling_strategy="group_by_length" if grouped else "random",
                                         report_to=[], save_strategy="no", disable_tqdm=True, logging_strategy="no",
                                         use_cpu=True, seed=0, dataloader_num_workers=0)
            collator = DataCollatorWithPadding(tokenizer)

            def counting(features):
                batch = collator(features)
                tokens[name].append(int(batch["attention_mask"].sum()))
                return batch

            DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                                data_collator=counting, callbacks=[clock]).train()
        return go

    with tempfile.TemporaryDirectory() as tmp:
        times = lockstep({name: run(name, data, grouped, tmp) for name, (data, grouped) in settings.items()})
    result = {}
    for name, t in times.items():
        real = tokens[name][a.warmup:len(t)]  # batch i is step i
        per_step = [n / s for n, s in zip(real, t[a.warmup:])]
        result[name] = {"tokens_per_s": statistics.median(per_step), "step_s": statistics.median(t[a.warmup:]),
                        "real_tokens_per_step": statistics.fmean(real)}
    base = result["pad_128"]["tokens_per_s"]
    headline = {f"speedup_{name}": round(r["tokens_per_s"] / base, 3) for name, r in result.items() if name != "pad_128"}
    headline["tokens_per_s"] = {name: round(r["tokens_per_s"]) for name, r in result.items()}
    headline["fitted_max_seq_length"] = fitted
    write_result("train_throughput", {
        "headline": headline, "settings": result, "step_times": times, "seeds": [0],
        "length_distribution": {"p50": float(np.percentile(lengths, 50)), "p99": float(np.percentile(lengths, 99)),
                                "p99.9": float(np.percentile(lengths, 99.9)), "max": int(lengths.max())},
        "setup": {"teacher": "all-MiniLM-L6-v2", "student": "teacher blocks 0,2,4", "batch_size": a.batch_size,
                  "steps": a.steps, "warmup": a.warmup, "data": "SST-2 train (shuffled, seed 0)",
                  "torch_threads": torch.get_num_threads()},
    })


if __name__ == "__main__":
    main()
