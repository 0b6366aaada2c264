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

    def moe_margin(self) -> tuple[float, float]:
        """The MoE's margin over the dense baseline in points: mean and std of the per-seed (paired) differences."""
        return _mean_std([100 * (m - d) for m, d in zip(self.accuracy["moe"], self.accuracy["dense"])])

    def seeds(self) -> int:
        """Seeds with both a dense baseline and an MoE result (the pairs the margin's spread comes from)."""
        return min(len(self.accuracy.get("moe", [])), len(self.accuracy.get("dense", [])))

    def margin_is_clear(self) -> bool:
        """True when the MoE beats the dense baseline by more than the paired spread; False with fewer than 2 seeds
        (no spread to compare with)."""
        mean, std = self.moe_margin()
        return self.seeds() >= 2 and mean > 0 and mean > std

    def summary(self) -> dict[str, Any]:
        """Mean/std accuracy (%) per model and % of MoE benefit preserved (on the means) per student; None where the
        MoE's margin over the dense baseline is not larger than its paired spread (the ratio would be noise)."""
        dense, moe = (statistics.fmean(self.accuracy[k]) for k in ("dense", "moe"))
        clear = self.margin_is_clear()
        rows = {}
        for name, values in self.accuracy.items():
            mean, std = _mean_std(values)
            delta_mean, delta_std = _mean_std([100 * (v - d) for v, d in zip(values, self.accuracy["dense"])])
            rows[name] = {"accuracy_mean": 100 * mean, "accuracy_std": 100 * std, "seeds": len(values),
                          "delta_vs_dense_mean": delta_mean, "delta_vs_dense_std": delta_std,
                          "benefit_preserved_pct": None if _is_baseline(name) or not clear
                          else benefit_preserved(mean, dense, moe)}
        margin, spread = self.moe_margin()
        speedup = {f"speedup_batch{b}": self.latency_ms[f"moe_batch{b}"] / self.latency_ms[f"dense_batch{b}"]
                   for b in (1, 64) if f"dense_batch{b}" in self.latency_ms}
        return {"models": rows, "latency_ms": self.latency_ms, "params": self.params, "moe_margin_mean": margin,
                "moe_margin_std": spread, **speedup}

    def table(self) -> str:
        names = {"dense": "dense baseline", "moe": "MoE teacher"}
        lines = ["| model | params | accuracy % (mean ± std) | Δ vs dense, paired by seed | % of MoE benefit preserved |",
                 "|---|---:|---:|---:|---:|"]
        for name, row in self.summary()["models"].items():
            kept = row["benefit_preserved_pct"]
            kept_text = "-" if _is_baseline(name) else f"{kept:.1f}" if kept is not None else self._no_benefit_reason()
            params = self.params["moe" if name == "moe" else "dense"]
            delta = "-" if name == "dense" else f"{row['delta_vs_dense_mean']:+.2f} ± {row['delta_vs_dense_std']:.2f}"
            lines.append(f"| {names.get(name, name)} | {params / 1e3:.1f}k | {row['accuracy_mean']:.2f} ± "
                         f"{row['accuracy_std']:.2f} | {delta} | {kept_text} |")
        return "\n".join(lines)

    def _no_benefit_reason(self) -> str:
        mean, std = self.moe_margin()
        if mean <= 0:
            return "n/a (MoE <= dense)"
        if self.seeds() < 2:
            return "n/a (1 seed: the % needs the paired spread of >= 2 seeds)"
        return f"n/a (MoE margin {mean:+.2f} ± {std:.2f} is within the paired spread)"
