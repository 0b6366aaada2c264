#!/usr/bin/env python
"""OPDF: does an MPO over-parameterised student distil better than the plain one?

Per GLUE task: a MiniLM-L6 teacher fine-tuned on the task, then a 3-layer student (MiniLM blocks 0,2,4) distilled
from it (logits KD, alpha 0.5, T 2) three ways, each over several seeds, same data, steps and learning rate:
plain; OPDF (`--mpo_overparameterize`: every linear of the encoder trained as MPO cores, contracted back to
nn.Linear before saving); OPDF + the tensor constraint loss (`--extra_loss_terms mpo_constraint=W`: MSE between
the student's and teacher's auxiliary MPO tensors, student block i -> teacher block 2i+1). Also reports trainable
parameters during training, the training step-time ratio OPDF / plain (from the runs' train_runtime, and
measured interleaved with plain so that machine load cancels) and the CPU latency ratio of the saved
(contracted) OPDF student to the plain one (same architecture: target <= 1.02).
Each run is one call of examples/run_glue.py, reused when its all_results.json exists (resumable).

    python benchmarks/opdf.py --data_dir ../shared/data/glue --tasks sst2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import DEFAULT_DATA, REPO, mean_std, write_result

TASKS = {  # metric, max_seq_length, student training subset and epochs (MRPC/RTE: the whole train split)
    "sst2": ("eval_accuracy", 64, 2000, 1), "mrpc": ("eval_f1", 128, 3668, 2), "rte": ("eval_accuracy", 128, 2490, 2),
}
TEACHER_SAMPLES = {"sst2": 4000, "mrpc": 3668, "rte": 2490}  # the teacher: MiniLM-L6 fine-tuned 3 epochs
STUDENT = ["--student_layers", "0,2,4", "--alpha", "0.5", "--temperature", "2"]


def variants(constraint_weight: float) -> dict[str, list[str]]:
    return {
        "plain_kd": STUDENT,
        "opdf": [*STUDENT, "--mpo_overparameterize", "true"],
        "opdf_constraint": [*STUDENT, "--mpo_overparameterize", "true", "--extra_loss_terms",
                            f"mpo_constraint={constraint_weight}"],
    }


def glue_command(task: str, out: Path, seed: int, a: argparse.Namespace, extra: list[str], teacher: bool = False) -> list[str]:
    _, max_len, samples, epochs = TASKS[task]
    samples, epochs = (TEACHER_SAMPLES[task], a.teacher_epochs) if teacher else (a.train_samples or samples, a.epochs or epochs)
    return [
        sys.executable, "examples/run_glue.py", "--task_name", task, "--data_dir", a.data_dir, "--output_dir", str(out),
        "--seed", str(seed), "--max_train_samples", str(samples), "--max_seq_length", str(max_len),
        "--num_train_epochs", str(epochs), "--per_device_train_batch_size", "32", "--learning_rate", str(a.lr),
        "--logging_steps", "25", "--save_strategy", "no", "--disable_tqdm", "true", "--overwrite_output_dir", "true",
        *extra,
    ]


def run_once(cmd: list[str], out: Path) -> dict:
    result_file = out / "all_results.json"
    if not result_file.exists():
        start = time.time()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
        print(f"[opdf] {out.name}: {time.time() - start:.0f} s", file=sys.stderr, flush=True)
    return json.loads(result_file.read_text())


def kd_step_time_ratio(teacher_dir: Path, repeats: int = 20) -> float:
    """Median KD training-step time (teacher forward + student forward/backward + AdamW step, batch 32 x 64
    tokens) of the OPDF student over the plain one, interleaved so that machine load affects both alike."""
    import copy

    import torch.nn.functional as F
    from transformers import AutoModelForSequenceClassification

    from hf_moekd.mpo import overparameterize
    from hf_moekd.students import student_from_teacher_layers

    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir).eval()
    plain = student_from_teacher_layers(teacher, [0, 2, 4]).train()
    opdf = copy.deepcopy(plain)
    overparameterize(opdf)
    students = [(m, torch.optim.AdamW(m.parameters(), lr=1e-5)) for m in (opdf, plain)]
    inputs = {"input_ids": torch.randint(1000, 2000, (32, 64)), "attention_mask": torch.ones(32, 64, dtype=torch.long)}
    times: list[list[float]] = [[], []]
    for step in range(repeats + 2):
        for i, (model, optimizer) in enumerate(students):
            start = time.perf_counter()
            with torch.no_grad():
                target = F.softmax(teacher(**inputs).logits / 2, -1)
            loss = F.kl_div(F.log_softmax(model(**inputs).logits / 2, -1), target, reduction="batchmean")
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if step >= 2:  # first two steps warm up allocator and optimizer state
                times[i].append(time.perf_counter() - start)
    return statistics.median(times[0]) / statistics.median(times[1])


@torch.inference_mode()
def latency_ratio(model_dir: Path, reference_dir: Path, repeats: int = 30) -> float:
    """Median forward time (batch 32 x 64 tokens) of `model_dir` over that of `reference_dir`, interleaved."""
    from transformers import AutoModelForSequenceClassification

    models = [AutoModelForSequenceClassification.from_pretrained(d).eval() for d in (model_dir, reference_dir)]
    inputs = {"input_ids": torch.randint(1000, 2000, (32, 64)), "attention_mask": torch.ones(32, 64, dtype=torch.long)}
    times: list[list[float]] = [[], []]
    for _ in range(repeats):
        for i, model in enumerate(models):
            start = time.perf_counter()
            model(**inputs)
            times[i].append(time.perf_counter() - start)
    return statistics.median(times[0]) / statistics.median(times[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=str(DEFAULT_DATA / "glue"))
    parser.add_argument("--work_dir", default=str(REPO / "runs" / "opdf"))
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--train_samples", type=int, default=None, help="student training subset (default: per task)")
    parser.add_argument("--epochs", type=float, default=None, help="student epochs (default: per task)")
    parser.add_argument("--teacher_epochs", type=float, default=3)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--constraint_weight", type=float, default=1.0)
    parser.add_argument("--teacher", action="append", default=[], metavar="TASK=DIR",
                        help="reuse a fine-tuned teacher, e.g. sst2=runs/kd_quality/sst2/teacher-seed0")
    a = parser.parse_args()
    given = dict(t.split("=", 1) for t in a.teacher)
    table, runs, extras = {}, {}, {}
    for task in a.tasks:
        metric = TASKS[task][0]
        teacher = Path(given[task]) if task in given else Path(a.work_dir, task, "teacher")
        if task not in given:
            runs[f"{task}/teacher"] = run_once(glue_command(task, teacher, 0, a, [], teacher=True), teacher)[metric]
        for name, extra in variants(a.constraint_weight).items():
            scores, runtimes, trainable = [], [], []
            for seed in a.seeds:
                out = Path(a.work_dir, task, f"{name}-seed{seed}")
                result = run_once(glue_command(task, out, seed, a, [*extra, "--teacher_model_name_or_path", str(teacher)]), out)
                if result["mode"] != "distil":
                    raise RuntimeError(f"{out} did not distil; delete it and rerun")
                scores.append(result[metric])
                runtimes.append(result["train_runtime"])
                trainable.append(result["trainable_params"])
            table[f"{task}/{name}"] = mean_std(scores)
            extras[f"{task}/{name}"] = {"train_runtime_mean": statistics.fmean(runtimes), "trainable_params": trainable[0]}
            print(f"[opdf] {task} {name}: {table[f'{task}/{name}']['mean']:.4f} ± {table[f'{task}/{name}']['std']:.4f}",
                  file=sys.stderr, flush=True)
        plain = extras[f"{task}/plain_kd"]["train_runtime_mean"]
        for name in ("opdf", "opdf_constraint"):
            extras[f"{task}/{name}"]["step_time_ratio"] = extras[f"{task}/{name}"]["train_runtime_mean"] / plain
        extras[f"{task}/opdf"]["kd_step_time_ratio_interleaved"] = kd_step_time_ratio(teacher)
        extras[f"{task}/opdf"]["latency_ratio_contracted"] = latency_ratio(
            Path(a.work_dir, task, "opdf-seed0"), Path(a.work_dir, task, "plain_kd-seed0"))
    headline = {k: round(v["mean"], 4) for k, v in table.items()}
    headline.update({f"{k}/step_time_ratio": round(v["step_time_ratio"], 3) for k, v in extras.items() if "step_time_ratio" in v})
    headline.update({f"{k}/kd_step_time_ratio_interleaved": round(v["kd_step_time_ratio_interleaved"], 3)
                     for k, v in extras.items() if "kd_step_time_ratio_interleaved" in v})
    headline.update({f"{k}/latency_ratio": round(v["latency_ratio_contracted"], 3) for k, v in extras.items()
                     if "latency_ratio_contracted" in v})
    write_result("opdf", {"headline": headline, "table": table, "extras": extras, "teachers": runs, "seeds": a.seeds,
                          "settings": {"student_samples_epochs": {t: [a.train_samples or TASKS[t][2], a.epochs or TASKS[t][3]] for t in a.tasks},
                                       "teacher_samples": TEACHER_SAMPLES, "teacher_epochs": a.teacher_epochs, "lr": a.lr,
                                       "constraint_weight": a.constraint_weight, "batch_size": 32}})


if __name__ == "__main__":
    main()
