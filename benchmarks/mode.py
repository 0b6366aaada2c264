#!/usr/bin/env python
"""MoDE (mutual distillation among experts, arXiv 2402.00893) on two MoE classifiers trained from scratch:

* fashion_mnist: the V-MoE of benchmarks/ones.py (8 experts, top-2, experts in every other block);
* sst2: the Mixtral-style MoE classifier of benchmarks/ones_text.py (8 experts, top-2, MiniLM-L6's tokenizer).

Plain MoE (alpha 0) vs MoE + MoDE (`--variant`, default 'all', the library's default) over an alpha sweep and several seeds: test accuracy,
expert probing (`hf_moekd.analysis.probe_experts`: each expert's accuracy when it alone serves the samples allocated
to it; allocation by the majority top-1 vote of a sample's tokens and by one token, CLS for V-MoE / last real token
for text), expert diversity (mean pairwise cosine of expert outputs and of expert weights, and the MoDE loss among
all experts on test data), and the training step time of MoDE 'routed' and 'all' relative to plain, measured
interleaved (same batches, rotating order) in one process.

Each (task, alpha, seed) run is cached in --work_dir/<task>/a<alpha>_s<seed>.json with the settings that shape it,
and the step times in --work_dir/<task>/timing.json: an interrupted benchmark resumes, and a cached run is reused
only when those settings are unchanged.

    python benchmarks/mode.py                      # both tasks, alphas 0 .. 1, seeds 0 1 2
    python benchmarks/mode.py --tasks fashion_mnist --train_samples 500 --epochs 1 --seeds 0 --alphas 0 0.1 \\
        --work_dir /tmp/mode_smoke                 # smoke test
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from common import (DEFAULT_DATA, REPO, kept_tasks, mean_std, previous_result, same_experiment, write_json,
                    write_result)
from ones import bench_args
from ones_text import accuracy as text_accuracy
from ones_text import moe_config, sst2_data
from transformers import MixtralForSequenceClassification, PreTrainedModel, set_seed

from hf_moekd.analysis import (
    expert_output_similarity,
    expert_weight_similarity,
    mode_loss_on_data,
    plot_probe,
    probe_experts,
)
from hf_moekd.data.images import IMAGE_LABELS, InMemoryDataset
from hf_moekd.mode import VARIANTS, mode_loss_per_example, patch_experts
from hf_moekd.models.vmoe import VMoEForImageClassification
from hf_moekd.studies.ones import OneSArguments
from hf_moekd.studies.vision import accuracy, load_data, model_configs, study_settings, train

ALPHAS = [0.0, 0.001, 0.003, 0.01, 0.1, 1.0]


@dataclass
class Task:
    name: str
    settings: dict[str, Any]
    """Everything that shapes a run besides alpha, seed and variant (the cache key)."""
    args: OneSArguments
    new_model: Callable[[], PreTrainedModel]
    train_data: Any
    collator: Any | None
    evaluate: Callable[[PreTrainedModel], float]
    probe_data: Any
    position: int
    """Token whose top-1 expert allocates a sample in the second probing (CLS: 0, last real token: -1)."""


def fashion_task(a: argparse.Namespace) -> Task:
    ones = Namespace(data_dir=a.data_dir, train_samples=a.train_samples, test_samples=a.test_samples, epochs=a.epochs,
                     kd_epochs=1, gatherings=["svd"], seeds=[0])
    args = bench_args(ones, 0)  # the V-MoE of benchmarks/ones.py
    data = load_data(args)
    _, config = model_configs(args, data["train"][0]["pixel_values"].shape[-1], IMAGE_LABELS["fashion_mnist"])
    probe = data["test"].select(range(min(a.probe_samples, len(data["test"]))))
    settings = {"task": "fashion_mnist", "args": study_settings(args), "probe_samples": a.probe_samples}
    return Task("fashion_mnist", settings, args, lambda: VMoEForImageClassification(config), data["train"], None,
                lambda m: accuracy(m, data["test"]), probe, position=0)


def sst2_task(a: argparse.Namespace) -> Task:
    tokenizer, data, collator = sst2_data(a.glue_dir, a.text_train_samples, a.max_length)
    config = moe_config(tokenizer, Namespace(hidden_size=a.hidden_size, layers=a.layers, max_length=a.max_length))
    args = OneSArguments(dataset="sst2", epochs=a.text_epochs, batch_size=32, learning_rate=1e-3, output_dir=None,
                         measure_speed=False, hidden_size=a.hidden_size, num_hidden_layers=a.layers, num_experts=8,
                         num_experts_per_tok=2)
    probe = data["validation"].select(range(min(a.probe_samples, len(data["validation"]))))
    settings = {"task": "sst2", "args": study_settings(args), "train_samples": a.text_train_samples,
                "max_length": a.max_length, "probe_samples": a.probe_samples}
    return Task("sst2", settings, args, lambda: MixtralForSequenceClassification(config), data["train"], collator,
                lambda m: text_accuracy(m, data["validation"], collator), probe, position=-1)


def run_one(task: Task, alpha: float, seed: int, variant: str, plot_dir: Path | None) -> dict[str, Any]:
    """Train one MoE (with MoDE at `alpha` unless 0) and analyse it."""
    set_seed(seed)
    model = task.new_model()
    start = time.perf_counter()
    terms = [f"mode={alpha},variant={variant}"] if alpha else None  # the registered MoDE loss term
    train(model, task.train_data, task.args, seed, task.args.epochs, data_collator=task.collator, extra_loss_terms=terms)
    trained = time.perf_counter()
    kw = {"batch_size": 128, "collate_fn": task.collator}
    by_vote = probe_experts(model, task.probe_data, **kw)
    by_token = probe_experts(model, task.probe_data, allocate_by=task.position, **kw)
    if plot_dir is not None:
        try:
            plot_probe(by_vote, plot_dir / f"mode_probe_{task.name}_a{alpha:g}_s{seed}.png",
                       title=f"{task.name}, MoDE alpha {alpha:g}, seed {seed}")
        except ImportError as err:
            print(f"[mode] no plot: {err}", flush=True)
    outputs = expert_output_similarity(model, task.probe_data, **kw)
    weights = expert_weight_similarity(model)
    return {
        "accuracy": task.evaluate(model),
        "probe_majority": by_vote.to_dict(),
        "probe_token": by_token.to_dict(),
        "output_cosine": outputs,
        "weight_cosine": weights,
        "output_cosine_mean": statistics.fmean(outputs.values()),
        "weight_cosine_mean": statistics.fmean(weights.values()),
        "mode_loss_all": mode_loss_on_data(model, task.probe_data, "all", **kw),
        "train_seconds": trained - start,
        "analysis_seconds": time.perf_counter() - trained,
    }


def timing_batches(task: Task, n: int) -> list[dict[str, torch.Tensor]]:
    data = task.train_data if task.collator else InMemoryDataset(task.train_data)
    loader = torch.utils.data.DataLoader(data, batch_size=task.args.batch_size, shuffle=False, collate_fn=task.collator)
    batches = []
    for batch in loader:
        if len(batches) == n:
            break
        batches.append(dict(batch))
    return batches


def step_times(task: Task, steps: int, reps: int, alpha: float = 0.1) -> dict[str, float]:
    """Median training step time (forward, backward, AdamW step) of plain MoE, MoDE routed and MoDE all, on the
    same batches, interleaved: for each batch every variant takes one step, in an order that rotates."""
    variants = [None, "routed", "all"]
    models, optimizers = {}, {}
    for variant in variants:
        set_seed(0)
        models[variant] = task.new_model().train()
        optimizers[variant] = torch.optim.AdamW(models[variant].parameters(), lr=task.args.learning_rate)

    def step(variant: str | None, batch: dict[str, torch.Tensor]) -> float:
        model, optimizer = models[variant], optimizers[variant]
        start = time.perf_counter()
        if variant is None:
            loss = model(**batch).loss
        else:
            with patch_experts(model, record=variant) as calls:
                loss = model(**batch).loss
            loss = loss + alpha * mode_loss_per_example(calls, len(batch["labels"]), batch.get("attention_mask")).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return time.perf_counter() - start

    batches = timing_batches(task, steps)
    for variant in variants:  # warm-up
        step(variant, batches[0])
    times: dict[str | None, list[float]] = {v: [] for v in variants}
    for rep in range(reps):
        for i, batch in enumerate(batches):
            shift = (rep * len(batches) + i) % len(variants)
            for variant in variants[shift:] + variants[:shift]:
                times[variant].append(step(variant, batch))
    median = {("plain" if v is None else v): 1e3 * statistics.median(t) for v, t in times.items()}
    return {"step_ms": median, "routed_vs_plain": median["routed"] / median["plain"],
            "all_vs_plain": median["all"] / median["plain"], "steps": len(batches) * reps}


def cached(path: Path, settings: dict[str, Any], compute: Callable[[], dict[str, Any]], label: str) -> dict[str, Any]:
    """The result saved at `path` when its settings match, else `compute()` (saved with the settings)."""
    if path.exists():
        saved = json.loads(path.read_text())
        if same_experiment(saved["settings"], settings):
            print(f"[mode] {label}: reusing {path}", flush=True)
            return saved["result"]
    start = time.perf_counter()
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"settings": settings, "result": result})
    print(f"[mode] {label}: {time.perf_counter() - start:.1f} s", flush=True)
    return result


def summarise(runs: dict[float, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per alpha: mean/spread over seeds; accuracy deltas paired by seed against alpha 0."""
    rows = {}
    plain = runs.get(0.0)
    for alpha, results in runs.items():
        def stat(fn: Callable[[dict], float | None]) -> dict[str, float] | None:
            values = [fn(r) for r in results]
            return None if any(v is None for v in values) else mean_std(values)

        pct = lambda value: None if value is None else 100 * value  # noqa: E731
        rows[str(alpha)] = {
            "accuracy": stat(lambda r: 100 * r["accuracy"]),
            "delta_vs_plain": None if plain is None else mean_std(
                [100 * (r["accuracy"] - p["accuracy"]) for r, p in zip(results, plain)]),
            "probe_mean_majority": stat(lambda r: pct(r["probe_majority"]["mean_probe_accuracy"])),
            "probe_weighted_majority": stat(lambda r: pct(r["probe_majority"]["weighted_probe_accuracy"])),
            "probe_mean_token": stat(lambda r: pct(r["probe_token"]["mean_probe_accuracy"])),
            "output_cosine": stat(lambda r: r["output_cosine_mean"]),
            "weight_cosine": stat(lambda r: r["weight_cosine_mean"]),
            "mode_loss_all": stat(lambda r: r["mode_loss_all"]),
            "train_seconds": stat(lambda r: r["train_seconds"]),
        }
    return rows


def table(rows: dict[str, Any]) -> str:
    def cell(stat: dict[str, float] | None, digits: int = 2, signed: bool = False) -> str:
        if stat is None:
            return "-"
        return f"{stat['mean']:{'+' if signed else ''}.{digits}f} ± {stat['std']:.{digits}f}"

    lines = ["| alpha | accuracy % | Δ vs plain (paired) | probing % (majority) | probing % (one token) | output cos | "
             "weight cos | MoDE loss (all) |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for alpha, r in rows.items():
        lines.append(f"| {float(alpha):g} | {cell(r['accuracy'])} | {cell(r['delta_vs_plain'], signed=True)} | "
                     f"{cell(r['probe_mean_majority'])} | {cell(r['probe_mean_token'])} | {cell(r['output_cosine'], 3)} | "
                     f"{cell(r['weight_cosine'], 3)} | {cell(r['mode_loss_all'], 5)} |")
    return "\n".join(lines)


def headline(rows: dict[str, Any], timing: dict[str, Any]) -> dict[str, Any]:
    mode_rows = {a: r for a, r in rows.items() if float(a) != 0.0}
    best = max(mode_rows, key=lambda a: mode_rows[a]["accuracy"]["mean"]) if mode_rows else None
    plain = rows.get("0.0")
    largest = max(rows, key=float)
    return {
        "plain_acc": plain and plain["accuracy"]["mean"],
        "best_alpha": best and float(best),
        "best_acc": best and rows[best]["accuracy"]["mean"],
        "best_delta_vs_plain": best and rows[best]["delta_vs_plain"] and rows[best]["delta_vs_plain"]["mean"],
        "probe_plain": plain and plain["probe_mean_majority"]["mean"],
        "probe_best": best and rows[best]["probe_mean_majority"]["mean"],
        "output_cosine_plain": plain and plain["output_cosine"]["mean"],
        f"output_cosine_alpha{float(largest):g}": rows[largest]["output_cosine"]["mean"],
        "step_time_routed_vs_plain": timing["routed_vs_plain"],
        "step_time_all_vs_plain": timing["all_vs_plain"],
    }


SECTIONS = ("headline", "summary", "tables", "timing", "per_run", "args_by_task")


def previous_tasks(a: argparse.Namespace) -> dict[str, Any]:
    """The previous result file's tasks that this run does not redo, each with the arguments it was measured with."""
    previous = previous_result(f"mode_{a.variant}")
    if "args" in previous:  # files written before args were kept per task
        previous["args_by_task"] = {t: previous["args"] for t in previous.get("tables", {})}
    return kept_tasks(previous, SECTIONS, a.tasks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["fashion_mnist", "sst2"], choices=["fashion_mnist", "sst2"])
    parser.add_argument("--alphas", type=float, nargs="+", default=ALPHAS, help="0 = plain MoE")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variant", default="all", choices=sorted(VARIANTS),
                        help="MoDE variant of the alpha sweep (results/mode_<variant>.json)")
    parser.add_argument("--work_dir", default=str(REPO / "runs" / "mode"))
    parser.add_argument("--data_dir", default=None, help="Fashion-MNIST IDX folder (default: Debian's)")
    parser.add_argument("--train_samples", type=int, default=20000, help="Fashion-MNIST training images")
    parser.add_argument("--test_samples", type=int, default=5000, help="Fashion-MNIST test images")
    parser.add_argument("--epochs", type=float, default=5, help="Fashion-MNIST epochs")
    parser.add_argument("--glue_dir", default=str(DEFAULT_DATA / "glue"), help="folder holding SST-2/")
    parser.add_argument("--text_train_samples", type=int, default=20000)
    parser.add_argument("--text_epochs", type=float, default=2)
    parser.add_argument("--hidden_size", type=int, default=128, help="SST-2 MoE width")
    parser.add_argument("--layers", type=int, default=2, help="SST-2 MoE blocks")
    parser.add_argument("--max_length", type=int, default=64)
    parser.add_argument("--probe_samples", type=int, default=2000, help="test samples for probing and diversity")
    parser.add_argument("--timing_steps", type=int, default=10, help="batches per timing round (0: no timing)")
    parser.add_argument("--timing_reps", type=int, default=3)
    parser.add_argument("--plot_dir", default=None, help="save a probing PNG per run here (needs matplotlib)")
    a = parser.parse_args()
    if len(set(a.alphas)) != len(a.alphas) or min(a.alphas) < 0:
        parser.error("--alphas must be distinct and >= 0")
    work = Path(a.work_dir)
    plot_dir = Path(a.plot_dir) if a.plot_dir else None

    payload = previous_tasks(a)
    for name in a.tasks:
        task = {"fashion_mnist": fashion_task, "sst2": sst2_task}[name](a)
        runs: dict[float, list[dict[str, Any]]] = {}
        for alpha in sorted(a.alphas):
            for seed in a.seeds:
                settings = {**task.settings, "alpha": alpha, "seed": seed, "variant": a.variant if alpha else None}
                result = cached(work / name / f"a{alpha:g}_s{seed}.json", settings,
                                lambda: run_one(task, alpha, seed, a.variant, plot_dir), f"{name} alpha={alpha:g} seed={seed}")
                print(f"[mode] {name} alpha={alpha:g} seed={seed}: accuracy {result['accuracy']:.4f}, probing "
                      f"{result['probe_majority']['mean_probe_accuracy']:.4f}, output cos "
                      f"{result['output_cosine_mean']:.3f}, train {result['train_seconds']:.1f} s, analysis "
                      f"{result['analysis_seconds']:.1f} s", flush=True)
                runs.setdefault(alpha, []).append(result)
        timing = {"routed_vs_plain": None, "all_vs_plain": None}
        if a.timing_steps:
            timing_settings = {**task.settings, "timing_steps": a.timing_steps, "timing_reps": a.timing_reps}
            timing = cached(work / name / "timing.json", timing_settings,
                            lambda: step_times(task, a.timing_steps, a.timing_reps), f"{name} step times")
        rows = summarise(runs)
        payload["summary"][name], payload["timing"][name] = rows, timing
        payload["tables"][name] = table(rows)
        payload["headline"][name] = headline(rows, timing)
        payload["per_run"][name] = {str(alpha): [{k: v for k, v in r.items() if k not in ("probe_majority", "probe_token")}
                                                  | {"probe_majority_rows": r["probe_majority"]["rows"]} for r in rs]
                                    for alpha, rs in runs.items()}
        print(f"\nMoDE ({a.variant}) on {name}, seeds {a.seeds}\n{payload['tables'][name]}\nstep time vs plain: "
              f"routed {timing['routed_vs_plain']}, all {timing['all_vs_plain']}\n", flush=True)
    payload["args_by_task"].update({name: vars(a) for name in a.tasks})
    write_result(f"mode_{a.variant}", payload)


if __name__ == "__main__":
    main()
