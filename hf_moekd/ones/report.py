"""The OneS study's results: per-seed accuracies of every model, latencies, and "% of the MoE's benefit preserved"."""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any


def benefit_preserved(student: float, dense: float, moe: float) -> float | None:
    """(student - dense) / (MoE - dense) in %, None when the MoE does not beat the dense baseline."""
    return None if moe <= dense else 100.0 * (student - dense) / (moe - dense)


def _is_baseline(name: str) -> bool:
    """The dense baseline, the MoE teacher and the dense controls: rows without a "% preserved"."""
    return name in {"dense", "moe"} or name.startswith("dense,")


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


@dataclass
class OneSReport:
    """Per-seed accuracies of every model, inference latencies, and where the saved model is."""

    args: dict[str, Any]
    accuracy: dict[str, list[float]] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)
    params: dict[str, int] = field(default_factory=dict)
    saved_model: str | None = None

    def add(self, name: str, value: float) -> None:
        self.accuracy.setdefault(name, []).append(value)

    def summary(self) -> dict[str, Any]:
        """Mean/std accuracy (%) per model and % of MoE benefit preserved (on the means) per student."""
        dense, moe = (statistics.fmean(self.accuracy[k]) for k in ("dense", "moe"))
        rows = {}
        for name, values in self.accuracy.items():
            mean, std = _mean_std(values)
            delta_mean, delta_std = _mean_std([100 * (v - d) for v, d in zip(values, self.accuracy["dense"])])
            rows[name] = {"accuracy_mean": 100 * mean, "accuracy_std": 100 * std, "seeds": len(values),
                          "delta_vs_dense_mean": delta_mean, "delta_vs_dense_std": delta_std,
                          "benefit_preserved_pct": None if _is_baseline(name) else benefit_preserved(mean, dense, moe)}
        speedup = {f"speedup_batch{b}": self.latency_ms[f"moe_batch{b}"] / self.latency_ms[f"dense_batch{b}"]
                   for b in (1, 64) if f"dense_batch{b}" in self.latency_ms}
        return {"models": rows, "latency_ms": self.latency_ms, "params": self.params, **speedup}

    def table(self) -> str:
        names = {"dense": "dense baseline", "moe": "MoE teacher"}
        lines = ["| model | params | accuracy % (mean ± std) | Δ vs dense, paired by seed | % of MoE benefit preserved |",
                 "|---|---:|---:|---:|---:|"]
        for name, row in self.summary()["models"].items():
            kept = row["benefit_preserved_pct"]
            kept_text = "-" if _is_baseline(name) else ("n/a (MoE <= dense)" if kept is None else f"{kept:.1f}")
            params = self.params["moe" if name == "moe" else "dense"]
            delta = "-" if name == "dense" else f"{row['delta_vs_dense_mean']:+.2f} ± {row['delta_vs_dense_std']:.2f}"
            lines.append(f"| {names.get(name, name)} | {params / 1e3:.1f}k | {row['accuracy_mean']:.2f} ± "
                         f"{row['accuracy_std']:.2f} | {delta} | {kept_text} |")
        return "\n".join(lines)
