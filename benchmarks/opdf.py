#!/usr/bin/env python
"""OPDF: does an MPO over-parameterised student distil better than the plain one?

Per GLUE task (and CoNLL-2003 NER, test entity F1): a MiniLM-L6 teacher fine-tuned on the task, then a 3-layer student (MiniLM blocks 0,2,4) distilled
from it (logits KD, alpha 0.5, T 2) three ways, each over several seeds, same data, steps and learning rate:
plain; OPDF (`--mpo_overparameterize`: every linear of the encoder trained as MPO cores, contracted back to
nn.Linear before saving); OPDF + the tensor constraint loss (`--extra_loss_terms mpo_constraint=W`: MSE between
the student's and teacher's auxiliary MPO tensors summed over a layer's auxiliary cores, as the official code, student
block i -> the teacher block it was copied from, 2i; weight 1e-4 / L by default, L the student's blocks, as in one
official script, or a sweep). The OPDF variants run in each decomposition gauge of `--gauges` (`--mpo_gauge`:
'official', the OPDF code's square-root gauge, rows `opdf_official*`; 'center', all scale in the central tensor,
rows `opdf_center*`). Every variant runs at each learning rate of `--lrs` (by default including the official
OPDF logs' 5e-6, which they train for 6 epochs: `--epochs 6` for that schedule) and is reported at its best one
(mean dev score over seeds), since the learning rate decided the CoNLL comparison before. Also reports trainable
parameters during training, the training step-time ratio OPDF / plain (from the runs' train_runtime, and
measured interleaved with plain so that machine load cancels) and the CPU latency ratio of the saved
(contracted) OPDF student to the plain one (same architecture: target <= 1.02).
Each run is one call of examples/run_glue.py (run_conll.py), reused when its all_results.json exists (resumable); the teacher's
logits on the training subset are computed once per task (`--teacher_logits_cache`) and shared by every student run.

    python benchmarks/opdf.py --data_dir ../shared/data
    python benchmarks/opdf.py --tasks rte       # one task; the others are kept from the result file
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from functools import partial
from pathlib import Path

import torch
from common import (DEFAULT_DATA, REPO, TEACHER_SAMPLES, add_parallel_arguments, interleaved_medians, kept_tasks,
                    latency_ratio, mean_std, previous_result, run_devices, run_scripts, task_command, teacher,
                    write_result)

TASKS = {  # metric, student training subset and epochs (MRPC/RTE: the whole train split)
    "sst2": ("eval_accuracy", 2000, 1), "mrpc": ("eval_f1", 3668, 1), "rte": ("eval_accuracy", 2490, 1),
    "conll": ("test_f1", 2000, 1),
}
STUDENT = ["--student_layers", "0,2,4", "--alpha", "0.5", "--temperature", "2"]


STUDENT_LAYERS = 3
DEFAULT_CONSTRAINT_WEIGHT = 1e-4 / STUDENT_LAYERS
OFFICIAL_LR = 5e-6  # the official OPDF GLUE logs: 3e-6 to 5e-6, 6 epochs
GAUGES = ("official", "center")


def variants(constraint_weights: list[float], gauges: list[str]) -> dict[str, list[str]]:
    found = {"plain_kd": STUDENT}
    for gauge in gauges:
        mpo = [*STUDENT, "--mpo_overparameterize", "true", "--mpo_gauge", gauge]
        found[f"opdf_{gauge}"] = mpo
        for w in constraint_weights:
            name = f"opdf_{gauge}_constraint" + ("" if len(constraint_weights) == 1 else f"_w{w:g}")
            found[name] = [*mpo, "--extra_loss_terms", f"mpo_constraint={w}"]
    return found


def kd_step_time_ratio(teacher_dir: Path, task: str, gauge: str, repeats: int = 20) -> float:
    """Median KD training-step time (teacher forward + student forward/backward + AdamW step, batch 32 x 64
    tokens) of the OPDF student over the plain one, interleaved so that machine load affects both alike."""
    import copy

    import torch.nn.functional as F

    from hf_moekd.opdf import overparameterize
    from hf_moekd.model_utils.students import student_from_teacher_layers
    from hf_moekd.recipes.tasks import get_task

    teacher = get_task(task).auto_class.from_pretrained(teacher_dir).eval()
    plain = student_from_teacher_layers(teacher, [0, 2, 4]).train()
    opdf = copy.deepcopy(plain)
    overparameterize(opdf, gauge=gauge)
    inputs = {"input_ids": torch.randint(1000, 2000, (32, 64)), "attention_mask": torch.ones(32, 64, dtype=torch.long)}

    def kd_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        with torch.no_grad():
            target = F.softmax(teacher(**inputs).logits / 2, -1)
        F.kl_div(F.log_softmax(model(**inputs).logits / 2, -1), target, reduction="batchmean").backward()
        optimizer.step()
        optimizer.zero_grad()

    steps = {name: partial(kd_step, m, torch.optim.AdamW(m.parameters(), lr=1e-5)) for name, m in
             (("opdf", opdf), ("plain", plain))}
    t = interleaved_medians(steps, repeats, warmup=2)  # warm-up: allocator and optimizer state
    return t["opdf"] / t["plain"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=str(DEFAULT_DATA), help="folder holding glue/ and conll2003/")
    parser.add_argument("--work_dir", default=str(REPO / "runs" / "opdf"))
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--train_samples", type=int, default=None, help="student training subset (default: per task)")
    parser.add_argument("--epochs", type=float, default=None, help="student epochs (default: per task)")
    parser.add_argument("--lrs", nargs="+", type=float, default=[OFFICIAL_LR, 1e-4, 5e-4],
                        help=f"learning-rate grid; each variant is reported at its best (mean dev score); {OFFICIAL_LR:g} "
                             "is the official OPDF one")
    parser.add_argument("--gauges", nargs="+", default=list(GAUGES), choices=GAUGES,
                        help="MPO decomposition gauges of the OPDF rows (official: the OPDF code's square-root gauge; "
                             "center: all scale in the central tensor)")
    parser.add_argument("--constraint_weights", nargs="*", type=float, default=[DEFAULT_CONSTRAINT_WEIGHT],
                        help="constraint weights (several: a sweep, one row each; none: no constraint row)")
    parser.add_argument("--teacher", action="append", default=[], metavar="TASK=DIR",
                        help="reuse a fine-tuned teacher, e.g. sst2=runs/kd_quality/sst2/teacher-seed0")
    parser.add_argument("--result_name", default="opdf", help="benchmarks/results/<name>.json (e.g. opdf_official_schedule "
                        "for the official 6-epoch schedule, keeping opdf.json)")
    add_parallel_arguments(parser)
    a = parser.parse_args()
    given = dict(t.split("=", 1) for t in a.teacher)
    tasks = previous_tasks(a)
    for task in a.tasks:
        tasks[task] = run_task(task, a, given)
    headline = {}
    for task, r in tasks.items():
        headline.update({f"{task}/{name}": round(v["mean"], 4) for name, v in r["table"].items()})
        headline.update({f"{task}/{name}_minus_plain": round(v["mean"], 4) for name, v in r["paired_delta"].items()})
        headline.update({f"{task}/{k}": round(v, 3) for k, v in r["ratios"].items()})
    write_result(a.result_name, {"headline": headline, "tasks": tasks, "seeds": a.seeds,
                          "settings": {"teacher_samples": TEACHER_SAMPLES, "teacher_epochs": 3, "batch_size": 32}})


def task_settings(task: str, a: argparse.Namespace) -> dict:
    """What shapes one task's rows (a saved task is kept in the result file only when these are unchanged)."""
    _, samples, epochs = TASKS[task]
    return {"train_samples": a.train_samples or samples, "epochs": a.epochs or epochs, "lrs": a.lrs, "seeds": a.seeds,
            "constraint_weights": a.constraint_weights, "gauges": a.gauges}


def previous_tasks(a: argparse.Namespace) -> dict:
    """Tasks of the previous result file that this run does not redo (each keeps its own settings and command)."""
    kept = kept_tasks(previous_result(a.result_name), ["tasks"], a.tasks)["tasks"]
    return {t: r for t, r in kept.items() if t in TASKS}


def run_task(task: str, a: argparse.Namespace, given: dict[str, str]) -> dict:
    metric, samples, epochs = TASKS[task]
    teacher_dir = teacher(task, Path(a.work_dir), a.data_dir, given, "opdf")
    teacher_file = teacher_dir / "all_results.json"
    kd = ["--teacher_model_name_or_path", str(teacher_dir), "--teacher_logits_cache", str(Path(a.work_dir, task, "teacher-logits"))]
    table, extras, values, best_lr = {}, {}, {}, {}
    rows = variants(a.constraint_weights, a.gauges)
    grid = [(name, lr, seed) for name in rows for lr in a.lrs for seed in a.seeds]
    outs = {key: Path(a.work_dir, task, f"{key[0]}-lr{key[1]:g}-seed{key[2]}") for key in grid}
    jobs = [(task_command(task, outs[name, lr, seed], seed, a.data_dir, a.train_samples or samples, a.epochs or epochs,
                          lr, [*rows[name], *kd]), outs[name, lr, seed]) for name, lr, seed in grid]
    done = dict(zip(grid, run_scripts(jobs, "opdf", a.workers, run_kind="distil")))
    for name in rows:
        by_lr = {}
        for lr in a.lrs:
            results = by_lr[lr] = [done[name, lr, seed] for seed in a.seeds]
            scores = [r[metric] for r in results]
            print(f"[opdf] {task} {name} lr {lr:g}: {statistics.fmean(scores):.4f}", file=sys.stderr, flush=True)
        best_lr[name] = max(a.lrs, key=lambda lr: statistics.fmean(r[metric] for r in by_lr[lr]))
        results = by_lr[best_lr[name]]
        values[name] = [r[metric] for r in results]
        table[name] = {**mean_std(values[name]), "lr": best_lr[name],
                       "by_lr": {f"{lr:g}": mean_std([r[metric] for r in by_lr[lr]]) for lr in a.lrs}}
        extras[name] = {"train_runtime_mean": statistics.fmean(r["train_runtime"] for r in results),
                        "trainable_params": results[0]["trainable_params"]}
        print(f"[opdf] {task} {name}: {table[name]['mean']:.4f} ± {table[name]['std']:.4f} (lr {best_lr[name]:g})",
              file=sys.stderr, flush=True)
    others = [name for name in table if name != "plain_kd"]
    ratios = {} if a.no_speed else speed_ratios(task, a, teacher_dir, extras, best_lr)
    return {
        "metric": metric, "table": table, "extras": extras, "ratios": ratios,
        "paired_delta": {name: mean_std([x - y for x, y in zip(values[name], values["plain_kd"])])
                         for name in others},
        "teacher": json.loads(teacher_file.read_text()).get(metric) if teacher_file.exists() else None,
        "settings": {**task_settings(task, a), "devices": run_devices(done.values())},
        "command": " ".join(["python", *sys.argv]),
    }


def speed_ratios(task: str, a: argparse.Namespace, teacher_dir: Path, extras: dict, best_lr: dict) -> dict[str, float]:
    """OPDF / plain: training runtime of the runs, KD step time measured interleaved, contracted CPU latency."""
    plain = extras["plain_kd"]["train_runtime_mean"]
    ratios = {f"{name}/train_runtime_ratio": extras[name]["train_runtime_mean"] / plain for name in extras
              if name != "plain_kd"}
    opdf = f"opdf_{a.gauges[0]}"
    ratios[f"{opdf}/kd_step_time_ratio_interleaved"] = kd_step_time_ratio(teacher_dir, task, a.gauges[0])
    ratios[f"{opdf}/latency_ratio_contracted"] = latency_ratio(Path(a.work_dir, task, f"{opdf}-lr{best_lr[opdf]:g}-seed0"),
                                                            Path(a.work_dir, task, f"plain_kd-lr{best_lr['plain_kd']:g}-seed0"),
                                                            task=task)
    return ratios


if __name__ == "__main__":
    main()
