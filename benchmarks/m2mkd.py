#!/usr/bin/env python
"""m2mKD on Fashion-MNIST: a V-MoE student trained (a) end to end only, (b) by m2mKD (per-module distillation from a
ViT teacher inside a shallow meta model) then end to end, on the same budget of student forward passes; in
distribution and out of distribution (rotated and noised test images), over three seeds.

The ViT teacher and the meta model are trained here once (first seed); each seed then trains the modules, the
assembled student's fine-tune and the baseline. Every stage is a folder under --work_dir, reused when its settings are
unchanged (retrained when they changed), so an interrupted benchmark resumes where it stopped.

    python benchmarks/m2mkd.py                       # Debian's dataset-fashion-mnist

The defaults are the official m2mKD recipe (issue 29): meta model trained from scratch, experts in every student
block, no gate loss in the module phase. This project's former setting (results/m2mkd_before_issue29.json):

    python benchmarks/m2mkd.py --meta_init teacher --moe_layer_frequency 2 --module_gate_loss
"""
from __future__ import annotations

import argparse
import statistics
import time

from common import REPO, write_result

from hf_moekd.studies.m2mkd import M2MArguments, run_m2mkd
from hf_moekd.m2mkd.report import M2MReport, print_report


def bench_args(a: argparse.Namespace) -> M2MArguments:
    return M2MArguments(
        dataset="fashion_mnist", data_dir=a.data_dir, max_train_samples=a.train_samples, max_test_samples=a.test_samples,
        patch_size=7, teacher_hidden_size=a.teacher_hidden_size, teacher_layers=a.teacher_layers, teacher_heads=4,
        teacher_intermediate_size=2 * a.teacher_hidden_size, hidden_size=a.hidden_size, num_hidden_layers=a.student_layers,
        num_attention_heads=4, intermediate_size=a.hidden_size, num_experts=8, num_experts_per_tok=2,
        moe_layer_frequency=a.moe_layer_frequency, num_modules=a.num_modules, meta_init=a.meta_init,
        module_gate_loss=a.module_gate_loss, teacher_epochs=a.teacher_epochs,
        meta_epochs=a.meta_epochs, module_epochs=a.module_epochs, finetune_epochs=a.finetune_epochs, batch_size=64,
        learning_rate=a.learning_rate, budget=a.budget, seeds=a.seeds, output_dir=a.work_dir, overwrite_output_dir=True,
    )


def headline(report: M2MReport, seconds: float) -> dict:
    summary = report.summary()
    models = summary["models"]
    acc = {name: {m: 100 * models[name][m][0] for m in ("iid", "rotated", "noised")} for name in models}
    forwards = {name: models[name]["student_forwards"][0] for name in models if name != "ViT teacher"}
    return {
        "teacher_acc": acc["ViT teacher"], "meta_acc": 100 * summary["meta_iid"],
        "end_to_end_acc": acc["V-MoE end to end only"], "m2mkd_acc": acc["V-MoE m2mKD + fine-tune"],
        "delta_m2mkd_minus_end_to_end": {m: v[0] for m, v in summary["delta_m2mkd_minus_baseline"].items()},
        "delta_std": {m: v[1] for m, v in summary["delta_m2mkd_minus_baseline"].items()},
        "assembled_before_finetune_acc": 100 * statistics.fmean(r["results"]["assembled_iid"]
                                                                for r in report.student.values()),
        "student_forwards": forwards, "budget": report.args["budget"], "seeds": len(report.student),
        "recipe": {k: report.args[k] for k in ("meta_init", "moe_layer_frequency", "module_gate_loss")},
        "wall_seconds": round(seconds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=None, help="Fashion-MNIST IDX folder (default: Debian's)")
    parser.add_argument("--work_dir", default=str(REPO / "runs" / "m2mkd"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train_samples", type=int, default=20000)
    parser.add_argument("--test_samples", type=int, default=5000)
    parser.add_argument("--teacher_hidden_size", type=int, default=128)
    parser.add_argument("--teacher_layers", type=int, default=8)
    parser.add_argument("--hidden_size", type=int, default=64, help="student width")
    parser.add_argument("--student_layers", type=int, default=8)
    parser.add_argument("--moe_layer_frequency", type=int, default=1,
                        help="1: experts in every block (official m2mKD), 2: every other block (former setting)")
    parser.add_argument("--meta_init", choices=["scratch", "teacher"], default="scratch",
                        help="meta model from scratch (official) or from the teacher's blocks (former setting)")
    parser.add_argument("--module_gate_loss", action="store_true",
                        help="keep the V-MoE's balancing loss in the module phase (former setting; official: none)")
    parser.add_argument("--num_modules", type=int, default=4)
    parser.add_argument("--teacher_epochs", type=float, default=10)
    parser.add_argument("--meta_epochs", type=float, default=3, help="official ratio: 3 x --module_epochs")
    parser.add_argument("--module_epochs", type=float, default=1)
    parser.add_argument("--finetune_epochs", type=float, default=6,
                        help="the baseline trains num_modules * module_epochs + finetune_epochs epochs (--budget forwards)")
    parser.add_argument("--budget", choices=["forwards", "blocks"], default="forwards",
                        help="forwards: a module pass counts as a full student forward pass; blocks: as its share")
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--result_name", default="m2mkd",
                        help="benchmarks/results/<name>.json (another name keeps m2mkd.json, e.g. for an ablation)")
    a = parser.parse_args()

    start = time.time()
    report = run_m2mkd(bench_args(a))
    print_report(report)
    write_result(a.result_name, {"headline": headline(report, time.time() - start), "summary": report.summary(),
                           "table": report.table(), "args": report.args,
                           "stages": {"teacher": report.teacher, "meta": report.meta, "modules": report.modules,
                                      "student": report.student, "baseline": report.baseline}})


if __name__ == "__main__":
    main()
