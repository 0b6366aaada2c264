"""The results of an m2mKD run: every stage's record, a summary (means, paired deltas) and a Markdown table."""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any


@dataclass
class M2MReport:
    """Records of every stage of a `run_m2mkd` call (what exists after its phase)."""

    args: dict[str, Any]
    teacher: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    modules: dict[int, list[dict[str, Any]]] = field(default_factory=dict)  # seed -> records of its modules
    student: dict[int, dict[str, Any]] = field(default_factory=dict)
    baseline: dict[int, dict[str, Any]] = field(default_factory=dict)

    def rows(self) -> dict[str, dict[str, list[float]]]:
        """Model -> metric -> per-seed values (accuracies as fractions, forward passes as example counts)."""
        rows: dict[str, dict[str, list[float]]] = {}
        for name, records in (("ViT teacher", {0: self.teacher}), ("V-MoE end to end only", self.baseline),
                              ("V-MoE m2mKD + fine-tune", self.student)):
            for record in records.values():
                for metric, value in record.get("results", {}).items():
                    if isinstance(value, (int, float)):
                        rows.setdefault(name, {}).setdefault(metric, []).append(value)
        return rows

    def summary(self) -> dict[str, Any]:
        """Means/stds per model and metric, the paired m2mKD - baseline deltas (accuracy points), per-module paths."""
        out: dict[str, Any] = {"models": {name: {m: _mean_std(v) for m, v in metrics.items()}
                                          for name, metrics in self.rows().items()}}
        seeds = sorted(set(self.student) & set(self.baseline))
        for metric in ("iid", "rotated", "noised"):
            deltas = [100 * (self.student[s]["results"][metric] - self.baseline[s]["results"][metric]) for s in seeds]
            if deltas:
                out.setdefault("delta_m2mkd_minus_baseline", {})[metric] = _mean_std(deltas)
        out["meta_iid"] = self.meta.get("results", {}).get("iid")
        out["teacher_path_iid"] = self.meta.get("results", {}).get("teacher_path_iid")
        out["student_path_iid"] = {s: [m["results"]["student_path_iid"] for m in mods] for s, mods in self.modules.items()}
        return out

    def table(self) -> str:
        lines = ["| model | test acc % | rotated % | noised % | student forward passes (block-equivalent) |",
                 "|---|---:|---:|---:|---:|"]
        for name, metrics in self.rows().items():
            cells = [f"{100 * _mean_std(metrics[m])[0]:.2f} ± {100 * _mean_std(metrics[m])[1]:.2f}"
                     if m in metrics else "-" for m in ("iid", "rotated", "noised")]
            forwards = "-" if name == "ViT teacher" else (f"{statistics.fmean(metrics['student_forwards']):,.0f} "
                                                          f"({statistics.fmean(metrics['student_block_forwards']):,.0f})")
            lines.append(f"| {name} | {' | '.join(cells)} | {forwards} |")
        if self.student:
            mean, std = _mean_std([r["results"]["assembled_iid"] for r in self.student.values()])
            modules = statistics.fmean(sum(m["results"]["train_forwards"] for m in self.modules[s]) for s in self.student)
            lines.append(f"| (m2mKD modules assembled, before fine-tune) | {100 * mean:.2f} ± {100 * std:.2f} | - | - | "
                         f"{modules:,.0f} |")
        return "\n".join(lines)


def poor_teacher_paths(meta_iid: float, teacher_path_iid: list[float]) -> list[int]:
    """The modules whose teacher path (the meta model with the teacher's module i) reaches less than half the meta
    model's accuracy: that teacher module does not fit the meta model, so its KD targets are poor.

    Expected with a meta model trained from scratch and a teacher trained outside it, for the first module (the
    teacher's stem) and the last (its head). The official recipe incubates the teacher's modules inside its meta
    model first (Deep Incubation's MT and FT phases, kamanphoebe/m2mKD TRAIN-MOE.md lines 28-43), which this project
    does not implement; `meta_init="teacher"` makes the meta model share the teacher's stem and head instead.
    """
    return [i for i, acc in enumerate(teacher_path_iid) if acc < 0.5 * meta_iid]


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)



def _moe_blocks(frequency: int | None) -> str:
    return "MoE in every block" if frequency in (None, 1) else f"MoE in one block of every {frequency}"


def print_report(report: M2MReport) -> None:
    args, summary = report.args, report.summary()
    print(f"\nm2mKD on {args['dataset']}: ViT teacher ({report.teacher.get('run_id', '')[:8]}) cut into "
          f"{args['num_modules']} modules -> V-MoE student ({args['num_hidden_layers']} blocks, width "
          f"{args['hidden_size']}, {args['num_experts']} experts, top-{args['num_experts_per_tok']}, "
          f"{_moe_blocks(args.get('moe_layer_frequency'))}); meta model from {args.get('meta_init', 'scratch')}; "
          f"module gate loss {'on' if args.get('module_gate_loss') else 'off'}; seeds {args['seeds']}; "
          f"budget matched by {args['budget']}")
    if summary["meta_iid"] is not None:
        paths = ", ".join(f"{100 * a:.1f}" for a in summary["teacher_path_iid"])
        print(f"meta model {100 * summary['meta_iid']:.2f}%; teacher paths (meta + teacher module i): {paths}")
        if poor := poor_teacher_paths(summary["meta_iid"], summary["teacher_path_iid"]):
            print(f"teacher modules {poor} do not fit the meta model (teacher path below half the meta model's "
                  "accuracy): their KD targets are poor; see hf_moekd.m2mkd.report.poor_teacher_paths")
    for seed, accs in summary["student_path_iid"].items():
        print(f"[seed {seed}] student paths (meta + student module i): {', '.join(f'{100 * a:.1f}' for a in accs)}")
    if report.student or report.baseline:
        print(report.table())
    for metric, (mean, std) in summary.get("delta_m2mkd_minus_baseline", {}).items():
        print(f"m2mKD - end to end, {metric}: {mean:+.2f} ± {std:.2f} points (paired by seed)")


__all__ = ["M2MReport", "poor_teacher_paths", "print_report"]
