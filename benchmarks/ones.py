#!/usr/bin/env python
"""OneS on Fashion-MNIST: V-MoE (8 experts, top-2) vs a dense ViT of the same width; every gathering strategy
with and without neuron alignment, before and after distillation; % of the MoE's benefit preserved; dense vs
V-MoE inference latency at batch 1 and 64.

Each seed is one `run_ones` call (dense baseline, V-MoE teacher, then every gathering variant, gathered-only and
after KD), saved to --work_dir/seed<N>.json, so an interrupted benchmark resumes at the next seed.

    python benchmarks/ones.py                       # Debian's dataset-fashion-mnist; ~10 min per seed on 2 cores
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from common import REPO, mean_std, same_experiment, write_json, write_result

from hf_moekd.ones import OneSReport
from hf_moekd.studies.ones import OneSArguments, print_report, run_ones
from hf_moekd.studies.vision import study_settings

GATHERINGS = ["average", "sum", "top_experts", "weighted_average", "svd", "svd-r16"]


def bench_args(a: argparse.Namespace, seed: int) -> OneSArguments:
    return OneSArguments(
        dataset="fashion_mnist", data_dir=a.data_dir, max_train_samples=a.train_samples, max_test_samples=a.test_samples,
        patch_size=7, hidden_size=64, intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
        num_experts=8, num_experts_per_tok=2, epochs=a.epochs, kd_epochs=a.kd_epochs, batch_size=64,
        gatherings=[g for base in a.gatherings for g in (base, f"{base}+align")], seeds=[seed], output_dir=None,
        measure_speed=seed == a.seeds[-1],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=None, help="Fashion-MNIST IDX folder (default: Debian's)")
    parser.add_argument("--work_dir", default=str(REPO / "runs" / "ones"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train_samples", type=int, default=20000)
    parser.add_argument("--test_samples", type=int, default=5000)
    parser.add_argument("--epochs", type=float, default=5)
    parser.add_argument("--kd_epochs", type=float, default=2)
    parser.add_argument("--gatherings", nargs="+", default=GATHERINGS, help="base variants; each also runs +align")
    parser.add_argument("--result_name", default="ones", help="benchmarks/results/<name>.json (e.g. ones_top_kg for a "
                        "run of other gatherings, keeping ones.json)")
    a = parser.parse_args()
    work = Path(a.work_dir)
    work.mkdir(parents=True, exist_ok=True)

    merged: OneSReport | None = None
    for seed in a.seeds:
        path = work / f"seed{seed}.json"
        args = bench_args(a, seed)
        if path.exists() and same_experiment(json.loads(path.read_text())["args"], study_settings(args)):
            saved = json.loads(path.read_text())
            report = OneSReport(args=saved["args"], accuracy=saved["accuracy"], latency_ms=saved["latency_ms"],
                                params=saved["params"])
            print(f"[ones] seed {seed}: reusing {path}", flush=True)
        else:
            report = run_ones(args)
            write_json(path, asdict(report))
        if merged is None:
            merged = OneSReport(args={**report.args, "seeds": a.seeds}, params=report.params)
        for name, values in report.accuracy.items():
            merged.accuracy.setdefault(name, []).extend(values)
        merged.latency_ms.update(report.latency_ms)
    assert merged is not None
    print_report(merged)
    summary = merged.summary()
    models = summary["models"]
    ones_rows = {k: v for k, v in models.items() if k.endswith("(OneS)")}
    best = max(ones_rows, key=lambda k: ones_rows[k]["accuracy_mean"])
    controls = {k: v["accuracy_mean"] for k, v in models.items() if k.startswith("dense,") or "no KD" in k}
    headline = {
        "dense_acc": models["dense"]["accuracy_mean"], "moe_acc": models["moe"]["accuracy_mean"],
        "best_ones": best, "best_ones_acc": ones_rows[best]["accuracy_mean"],
        "best_benefit_preserved_pct": ones_rows[best]["benefit_preserved_pct"],
        "best_ones_delta_vs_dense": ones_rows[best]["delta_vs_dense_mean"], "controls_acc": controls,
        "speedup_batch1": summary.get("speedup_batch1"), "speedup_batch64": summary.get("speedup_batch64"),
    }
    write_result(a.result_name, {"headline": headline, "summary": summary,
                          "per_seed": {k: mean_std(v) for k, v in merged.accuracy.items()},
                          "seeds": a.seeds, "args": merged.args, "table": merged.table()})


if __name__ == "__main__":
    main()
