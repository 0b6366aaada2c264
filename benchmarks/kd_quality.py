#!/usr/bin/env python
"""Distillation quality on real data: SST-2 dev accuracy and CoNLL-2003 test entity F1.

Rows: the fine-tuned MiniLM-L6 teacher; a 3-layer student (teacher blocks 0,2,4) trained without KD,
with logits KD, and with logits + intermediate KD (hidden-state MSE + MiniLMv2 attention relations).
Every row over several seeds (students distil from the seed-0 teacher). The teacher trains on the whole training
set (--teacher_train_samples 0, --teacher_epochs 1; batches grouped by length, which with dynamic padding makes a
full SST-2 epoch about 10 minutes here); the students on a fixed subset (--train_samples): a teacher that knows
more than the students' data is the setting KD is for. Each run is one call of examples/run_glue.py or
examples/run_conll.py; the exact commands are stored in the result file. Runs already finished in --work_dir are
reused, so an interrupted benchmark resumes.

    python benchmarks/kd_quality.py --data_dir ../shared/data
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common import DEFAULT_DATA, REPO, mean_std, run_script, write_result

VARIANTS = {
    "teacher": [],
    "student_no_kd": ["--student_layers", "0,2,4"],
    "student_logits_kd": ["--student_layers", "0,2,4", "--alpha", "0.5", "--temperature", "2"],
    "student_logits_intermediate_kd": [
        "--student_layers", "0,2,4", "--alpha", "0.5", "--temperature", "2",
        "--hidden_loss_weight", "1.0", "--attention_relation_weight", "1.0", "--relation_heads", "32",
    ],
}
KD_VARIANTS = {"student_logits_kd", "student_logits_intermediate_kd"}
TASKS = {
    "sst2": {"script": "examples/run_glue.py", "data": "glue", "metric": "eval_accuracy", "train_samples": 4000,
             "args": ["--task_name", "sst2", "--max_seq_length", "64"]},
    "conll": {"script": "examples/run_conll.py", "data": "conll2003", "metric": "test_f1", "train_samples": 4000,
              "args": ["--max_seq_length", "128"]},
}


def command(task: str, variant: str, seed: int, out: Path, teacher: Path, a: argparse.Namespace) -> list[str]:
    spec = TASKS[task]
    if variant == "teacher":
        budget = ["--num_train_epochs", str(a.teacher_epochs), "--train_sampling_strategy", "group_by_length"]
        budget += ["--max_train_samples", str(a.teacher_train_samples)] if a.teacher_train_samples else []
    else:
        budget = ["--num_train_epochs", str(a.epochs), "--max_train_samples", str(a.train_samples or spec["train_samples"])]
    cmd = [
        sys.executable, spec["script"], *spec["args"], "--data_dir", str(Path(a.data_dir) / spec["data"]),
        "--output_dir", str(out), "--seed", str(seed), *budget, "--per_device_train_batch_size", "32",
        "--learning_rate", str(a.lr), "--logging_steps", "25", "--save_strategy", "no", "--disable_tqdm", "true",
        "--overwrite_output_dir", "true", *VARIANTS[variant],
    ]
    if variant in KD_VARIANTS:
        cmd += ["--teacher_model_name_or_path", str(teacher)]
    return cmd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=str(DEFAULT_DATA), help="folder holding glue/ and conll2003/")
    parser.add_argument("--work_dir", default=str(REPO / "runs" / "kd_quality"))
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--train_samples", type=int, default=None, help="students; per-task default: 4000")
    parser.add_argument("--epochs", type=float, default=2, help="students' epochs")
    parser.add_argument("--teacher_train_samples", type=int, default=0, help="0: the whole training set")
    parser.add_argument("--teacher_epochs", type=float, default=1)
    parser.add_argument("--teacher_seeds", type=int, default=1, help="teacher rows over the first N seeds (students "
                        "distil from the first); a full-data teacher is one run per seed")
    parser.add_argument("--lr", type=float, default=1e-4)
    a = parser.parse_args()
    table, commands = {}, {}
    for task in a.tasks:
        teacher = Path(a.work_dir, task, f"teacher-seed{a.seeds[0]}")
        for variant in VARIANTS:
            scores = []
            for seed in a.seeds[: a.teacher_seeds] if variant == "teacher" else a.seeds:
                out = Path(a.work_dir, task, f"{variant}-seed{seed}")
                cmd = command(task, variant, seed, out, teacher, a)
                commands[f"{task}/{variant}/seed{seed}"] = " ".join(cmd[1:])
                result = run_script(cmd, out, "kd_quality")
                expected = "distil" if variant in KD_VARIANTS else "fine-tune"
                if result.get("run_kind") != expected:
                    raise RuntimeError(f"{out} ran as {result.get('run_kind')!r}, expected {expected!r}: delete it and rerun")
                scores.append(result[TASKS[task]["metric"]])
            table[f"{task}/{variant}"] = mean_std(scores)
            print(f"{task:6s} {variant:32s} {table[f'{task}/{variant}']['mean']:.4f} "
                  f"± {table[f'{task}/{variant}']['std']:.4f}", file=sys.stderr, flush=True)
    deltas = {f"{task}/{v}_minus_no_kd": mean_std([x - y for x, y in zip(
        table[f"{task}/{v}"]["values"], table[f"{task}/student_no_kd"]["values"])]) for task in a.tasks for v in KD_VARIANTS}
    headline = {k: round(v["mean"], 4) for k, v in {**table, **deltas}.items()}
    write_result("kd_quality", {
        "headline": headline, "table": table, "paired_deltas": deltas, "seeds": a.seeds, "metric": {t: TASKS[t]["metric"] for t in a.tasks},
        "settings": {"train_samples": {t: a.train_samples or TASKS[t]["train_samples"] for t in a.tasks}, "epochs": a.epochs,
                     "teacher_train_samples": a.teacher_train_samples or "all", "teacher_epochs": a.teacher_epochs,
                     "teacher_seeds": a.teacher_seeds, "lr": a.lr, "batch_size": 32},
        "runs": commands,
    })


if __name__ == "__main__":
    main()
