#!/usr/bin/env python
"""MiniMoE vs dense students of the same per-token FLOPs, with the same two-stage budget.

Teacher per task: all-MiniLM-L6-v2 fine-tuned (benchmarks/common.py's recipe). Two settings (`--student_init`):

* `teacher_layers` (default; results/minimoe.json): both students start from all-MiniLM-L6-v2's blocks 0,2,4
  (3L-384H only), a fair dense start: the MiniMoE student's experts are copies of those blocks' FFNs with the
  routing weight accounted for (`minimoe_from_dense(distinct_init="copy")`), so at step 0 it computes exactly what
  the dense student computes. `--kinds ... minimoe_moefy` adds the MiniMoE student with the official `moefy`
  partition instead (the start used before issue 29: FFN output about a third of the dense one's).
* `random` (the official recipe: both students from random init, MiniMoE experts moefied from a random wide FFN;
  results/minimoe_random.json): for budgets where random students learn (at 10,000 stage-1 sentences they do not;
  measured with `--stage1_samples 200000 --stage1_epochs 3 --train_samples 20000`, on a GPU).

Students: dense BERT (3L-384H; `--sizes` adds 4L-192H in the random setting) and its MiniMoE twin
(`--moe_experts 4`: four top-1 FFN experts, each the size of the dense FFN, so the same FLOPs per token plus a
router). For every student:
stage 1 (task-agnostic, examples/run_task_agnostic.py): MiniLMv2 Q-Q/K-K/V-V relations of the teacher's last layer
on a fixed subset of the unlabelled corpus (GLUE + CoNLL train sentences), seed 0; stage 2 (task-specific,
examples/run_glue.py / run_conll.py): (CE + T^2 soft CE)/2 with T = 2 from the task's teacher (logits cached once
per task), three seeds. Reports dev scores (CoNLL: test entity F1), parameters, FLOPs per token and the CPU latency
ratio MiniMoE / dense at batch 1 and 32 (interleaved, median). Every run is cached in --work_dir (resumable).

    python benchmarks/minimoe.py --data_dir ../shared/data --tasks sst2 conll --train_samples 4000 --lrs 1e-4 3e-4
    python benchmarks/minimoe.py --tasks stsb --train_samples 5749 --epochs 3   # one task; the others are kept
    python benchmarks/minimoe.py --student_init random --sizes 3L-384H 4L-192H   # the official setting
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from transformers import AutoConfig

import hf_moekd  # noqa: F401  (registers MiniMoE with the Auto classes)
from common import (DEFAULT_DATA, REPO, add_parallel_arguments, interleaved_medians, kept_tasks, latency_ratio,
                    mean_std, previous_result, run_devices, run_scripts, task_command, teacher_budget, teachers,
                    write_result)

METRICS = {"sst2": "eval_accuracy", "mrpc": "eval_f1", "rte": "eval_accuracy", "cola": "eval_matthews_correlation",
           "stsb": "eval_pearson", "conll": "test_f1"}
SIZES = {  # student_config_overrides of MiniLM-L6's config (hidden 384, 12 heads, FFN 1536)
    "3L-384H": "num_hidden_layers=3",
    "4L-192H": "num_hidden_layers=4,hidden_size=192,num_attention_heads=6,intermediate_size=768",
}
TEACHER_LAYERS = {"3L-384H": "0,2,4"}  # --student_init teacher_layers: the teacher's blocks a student starts from
# Student kinds. "minimoe": the recipe's default expert start ("copy" from the teacher's blocks: the dense student's
# function at step 0; "moefy" from a random student, as the official code); "minimoe_moefy": the official moefy
# partition from the teacher's blocks too (hf_moekd's start before issue 29).
KINDS = {"dense": [], "minimoe": ["--moe_experts", "4"],
         "minimoe_moefy": ["--moe_experts", "4", "--moe_expert_init", "moefy"]}
RESULT_NAMES = {"teacher_layers": "minimoe", "random": "minimoe_random"}


def student_start(size: str, init: str) -> list[str]:
    """Arguments that build the student of `size`: random init from config overrides, or the teacher's blocks."""
    if init == "random":
        return ["--student_config_overrides", SIZES[size]]
    if size not in TEACHER_LAYERS:
        raise SystemExit(f"--student_init teacher_layers needs the teacher's width: use --sizes {' '.join(TEACHER_LAYERS)}")
    return ["--student_layers", TEACHER_LAYERS[size]]


def ffn_breakdown(minimoe_dir: Path, dense_dir: Path, tokens: int = 64, repeats: int = 50) -> dict[str, float]:
    """Median microseconds of block 0's FFN on `tokens` tokens (one batch-1 sequence): the dense FFN, the MiniMoE FFN
    (router + dispatch + experts) and its expert matmuls alone on the same routed groups, measured interleaved."""
    import torch
    from transformers import AutoModelForSequenceClassification

    moe, dense = (AutoModelForSequenceClassification.from_pretrained(d).eval().base_model
                  for d in (minimoe_dir, dense_dir))
    dense_layer, sparse = dense.encoder.layer[0], moe.encoder.layer[0].ffn
    x = torch.randn(1, tokens, moe.config.hidden_size)
    with torch.inference_mode():
        groups, _ = sparse.experts.dispatch(x.view(tokens, -1), sparse.router(x.view(tokens, -1))[2])
        parts = {
            "dense_ffn": lambda: dense_layer.output.dense(dense_layer.intermediate(x)),
            "minimoe_ffn": lambda: sparse(x),
            "minimoe_expert_matmuls": lambda: [sparse.experts.expert_forward(e, g) for e, g in enumerate(groups)],
        }
        times = interleaved_medians(parts, repeats, warmup=5)
    return {name: round(1e6 * t, 1) for name, t in times.items()}


def init_suffix(a: argparse.Namespace) -> str:
    """Run-folder suffix of the student initialisation ("" for the official random init)."""
    return "" if a.student_init == "random" else f"_{a.student_init}"


def run_dir(a: argparse.Namespace, task: str, kind: str, size: str, lr: float, seed: int) -> Path:
    """Folder of one stage-2 run."""
    return Path(a.work_dir, task, f"{kind}-{size}{init_suffix(a)}-lr{lr:g}-seed{seed}")


def stage1_job(size: str, kind: str, a: argparse.Namespace) -> tuple[list[str], Path]:
    """Command and folder of the task-agnostic stage of the `kind` student of `size`."""
    out = Path(a.work_dir, "stage1", f"{kind}-{size}{init_suffix(a)}")
    cmd = [
        sys.executable, "examples/run_task_agnostic.py", "--data_dir", a.data_dir, "--output_dir", str(out),
        *student_start(size, a.student_init), *KINDS[kind], "--max_train_samples", str(a.stage1_samples),
        "--num_train_epochs", str(a.stage1_epochs), "--per_device_train_batch_size", "32", "--learning_rate",
        str(a.stage1_lr), "--seed", "0", "--logging_steps", "50", "--save_strategy", "steps", "--save_steps", "200",
        "--save_total_limit", "1", "--resume_from_checkpoint", "last", "--disable_tqdm", "true",
    ]
    return cmd, out


def stage2_job(a: argparse.Namespace, key: tuple, start: Path, teacher_dir: Path) -> tuple[list[str], Path]:
    """Command and folder of the stage-2 run `key` = (task, size, kind, lr, seed) from stage-1 model `start`."""
    task, size, kind, lr, seed = key
    out = run_dir(a, task, kind, size, lr, seed)
    kd = ["--teacher_model_name_or_path", str(teacher_dir), "--alpha", "0.5", "--temperature", "2",
          "--teacher_logits_cache", str(Path(a.work_dir, task, "teacher-logits"))]
    return task_command(task, out, seed, a.data_dir, a.train_samples, a.epochs, lr,
                        ["--model_name_or_path", str(start), *kd]), out


def flops_per_token(config, seq_len: int = 64) -> int:
    """Multiply-adds x 2 of one token through the encoder: Q/K/V/O projections, attention over `seq_len` keys, the
    FFN of the one expert it is routed to, the router; embeddings, pooler and head excluded."""
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    router = h * getattr(config, "num_ffn_experts", 1) if getattr(config, "num_ffn_experts", 1) > 1 else 0
    return 2 * layers * (4 * h * h + 2 * seq_len * h + 2 * h * i + router)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=str(DEFAULT_DATA), help="folder holding glue/ and conll2003/")
    parser.add_argument("--work_dir", default=str(REPO / "runs" / "minimoe"))
    parser.add_argument("--tasks", nargs="+", default=list(METRICS), choices=list(METRICS))
    parser.add_argument("--sizes", nargs="+", default=["3L-384H"], choices=list(SIZES))
    parser.add_argument("--kinds", nargs="+", default=["dense", "minimoe"], choices=list(KINDS),
                        help="students; dense is always run (the paired deltas are against it)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--student_init", default="teacher_layers", choices=["teacher_layers", "random"],
                        help="teacher_layers: both students from the teacher's blocks 0,2,4 (3L-384H only), the "
                             "MiniMoE experts copies of their FFNs (the dense student's function at step 0); random: "
                             "the official recipe, both from random init (MiniMoE experts moefied)")
    parser.add_argument("--stage1_samples", type=int, default=10000, help="corpus sentences of stage 1")
    parser.add_argument("--stage1_epochs", type=float, default=1)
    parser.add_argument("--stage1_lr", type=float, default=5e-4)
    parser.add_argument("--train_samples", type=int, default=2000, help="stage-2 training subset per task")
    parser.add_argument("--epochs", type=float, default=2, help="stage-2 epochs")
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-4],
                        help="stage-2 learning rates; each student is reported at its best (mean over seeds)")
    parser.add_argument("--teacher", action="append", default=[], metavar="TASK=DIR",
                        help="reuse a fine-tuned teacher, e.g. sst2=runs/opdf/sst2/teacher")
    add_parallel_arguments(parser)
    a = parser.parse_args()
    given = dict(t.split("=", 1) for t in a.teacher)
    kinds = ["dense", *(k for k in a.kinds if k != "dense")]
    if a.student_init == "random" and "minimoe_moefy" in kinds:
        raise SystemExit("--kinds minimoe_moefy is the teacher_layers setting's variant (a random MiniMoE student is "
                         "moefied already)")

    table, teacher_scores, budgets, models = {}, {}, {}, {}
    stage1_jobs = {(size, kind): stage1_job(size, kind, a) for size in a.sizes for kind in kinds}
    run_scripts(list(stage1_jobs.values()), "minimoe", a.workers)
    starts = {pair: out for pair, (_, out) in stage1_jobs.items()}
    for (size, kind), path in starts.items():
        config = AutoConfig.from_pretrained(path)
        models[f"{kind}-{size}"] = {"flops_per_token": flops_per_token(config),
                                    "params": json.loads((path / "all_results.json").read_text())["trainable_params"]}
    teacher_dirs = teachers(a.tasks, Path(a.work_dir), a.data_dir, given, "minimoe", a.workers)
    grid = [(task, size, kind, lr, seed) for task in a.tasks for size, kind in starts for lr in a.lrs
            for seed in a.seeds]
    jobs = [stage2_job(a, key, starts[key[1:3]], teacher_dirs[key[0]]) for key in grid]
    results = dict(zip(grid, run_scripts(jobs, "minimoe", a.workers, run_kind="distil")))
    for task in a.tasks:
        metric = METRICS[task]
        teacher_file = teacher_dirs[task] / "all_results.json"
        if teacher_file.exists():
            teacher_scores[task] = json.loads(teacher_file.read_text()).get(metric)
        budgets[task] = (f"given with --teacher ({given[task]})" if task in given else
                         "trained here (benchmarks/common.py)") + f": {teacher_budget(teacher_dirs[task]) or 'unknown'}"
        for size, kind in starts:
            by_lr = {lr: [results[task, size, kind, lr, seed][metric] for seed in a.seeds] for lr in a.lrs}
            best = max(a.lrs, key=lambda lr: statistics.fmean(by_lr[lr]))
            row = table[f"{task}/{kind}-{size}"] = {**mean_std(by_lr[best]), "lr": best,
                                                    "by_lr": {f"{lr:g}": mean_std(v) for lr, v in by_lr.items()}}
            print(f"[minimoe] {task} {kind}-{size}: {row['mean']:.4f} ± {row['std']:.4f} (lr {best:g})",
                  file=sys.stderr, flush=True)
    probe_task = None if a.no_speed else next((t for t in a.tasks if t != "conll"), None)
    latency, breakdown = {}, {}
    if probe_task is not None:  # saved stage-2 sequence classifiers of seed 0
        for size in a.sizes:
            pair = [run_dir(a, probe_task, kind, size, a.lrs[0], a.seeds[0]) for kind in ("minimoe", "dense")]
            latency[size] = {f"batch{b}": latency_ratio(*pair, batch=b) for b in (1, 32)}
            breakdown[size] = ffn_breakdown(*pair)
            print(f"[minimoe] {size} block-0 FFN, 64 tokens (us): {breakdown[size]}", file=sys.stderr, flush=True)
    gaps = {}
    for task in a.tasks:
        for size in a.sizes:
            dense = table[f"{task}/dense-{size}"]["values"]
            for kind in kinds[1:]:  # "<task>/<size>" for minimoe (the file's earlier key), "/<kind>" for the others
                moe = table[f"{task}/{kind}-{size}"]["values"]
                key = f"{task}/{size}" + ("" if kind == "minimoe" else f"/{kind}")
                gaps[key] = mean_std([m - d for m, d in zip(moe, dense)])
            if {"minimoe", "minimoe_moefy"} <= set(kinds):  # the fair start's own effect, paired by seed
                fair, moefy = (table[f"{task}/{k}-{size}"]["values"] for k in ("minimoe", "minimoe_moefy"))
                gaps[f"{task}/{size}/minimoe_copy_minus_moefy"] = mean_std([f - m for f, m in zip(fair, moefy)])
    settings = {"sizes": {s: SIZES[s] for s in a.sizes}, "student_init": a.student_init, "experts": 4, "kinds": kinds,
                "minimoe_expert_init": "copy" if a.student_init == "teacher_layers" else "moefy",
                "stage1_samples": a.stage1_samples, "stage1_epochs": a.stage1_epochs, "stage1_lr": a.stage1_lr,
                "train_samples": a.train_samples, "epochs": a.epochs, "lrs": a.lrs, "seeds": a.seeds, "batch_size": 32,
                "alpha": 0.5, "temperature": 2}
    payload = previous_tasks(RESULT_NAMES[a.student_init], a.tasks, a.student_init)
    for section, values in (("table", table), ("minimoe_minus_dense_paired", gaps), ("teachers", teacher_scores),
                            ("teacher_budget_by_task", budgets),
                            ("metric", {t: METRICS[t] for t in a.tasks}),
                            ("settings_by_task", {t: {**settings, "devices": run_devices(
                                r for key, r in results.items() if key[0] == t)} for t in a.tasks}),
                            ("command_by_task", {t: " ".join([Path(sys.executable).name, *sys.argv]) for t in a.tasks})):
        payload[section].update(values)
    if latency:  # else the previous file's latency is kept
        payload["latency_ratio_minimoe_over_dense"], payload["ffn_microseconds_batch1"] = latency, breakdown
    headline = {k: round(v["mean"], 4) for k, v in payload["table"].items()}
    headline.update({f"{k}/minimoe_minus_dense" if k.count("/") == 1 else k: round(v["mean"], 4)
                     for k, v in payload["minimoe_minus_dense_paired"].items()})
    headline.update({f"latency_ratio/{s}/{b}": round(r, 3)
                     for s, v in payload.get("latency_ratio_minimoe_over_dense", {}).items() for b, r in v.items()})
    headline.update(payload.pop("latency_headline"))
    write_result(RESULT_NAMES[a.student_init], {"headline": headline, **payload, "models": models})


TASK_SECTIONS = ("table", "minimoe_minus_dense_paired", "teachers", "teacher_budget_by_task", "metric", "settings_by_task",
                 "command_by_task")


def previous_tasks(name: str, redo: list[str], student_init: str) -> dict:
    """The previous result file's tasks that this run does not redo and that were measured in the same
    `student_init` setting (each with its settings and command), and its latency measurements."""
    previous = previous_result(name)
    if "settings" in previous:  # files written before settings were kept per task (all in the random setting)
        previous["settings_by_task"] = {
            t: {"student_init": "random", **previous["settings"], "seeds": previous["seeds"]}
            for t in previous.get("metric", {})}
        previous["command_by_task"] = {t: previous["command"] for t in previous.get("metric", {})}
    other = [t for t, s in previous.get("settings_by_task", {}).items() if s.get("student_init") != student_init]
    kept = kept_tasks(previous, TASK_SECTIONS, [*redo, *other])
    kept.update({k: previous[k] for k in ("latency_ratio_minimoe_over_dense", "ffn_microseconds_batch1", "latency")
                 if k in previous})  # "latency": benchmarks/minimoe_latency.py's section, with its headline keys
    kept["latency_headline"] = {k: v for k, v in previous.get("headline", {}).items()
                                if k.startswith(("latency_ratio_b", "latency_floor"))}
    return kept


if __name__ == "__main__":
    main()
