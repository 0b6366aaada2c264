"""PNG plots (matplotlib's Agg canvas; pyplot and its global state are not used): expert probing, training curves
of each loss term, routing histograms and the experts' singular-value spectra."""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _figure(rows: int, cols: int, width: float, height: float) -> tuple[Figure, Any]:
    """A figure on the Agg canvas and its `[rows, cols]` axes."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("plots need matplotlib: `pip install matplotlib`.") from err
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False)


def _save(fig: Figure, path: str | Path, title: str | None) -> Path:
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _grid(n: int, max_cols: int) -> tuple[int, int]:
    cols = min(max_cols, n)
    return math.ceil(n / cols), cols


def _short(layer: str) -> str:
    """'layer 3' for a module name with a block index, else the name."""
    numbers = re.findall(r"\.(\d+)(?:\.|$)", layer)
    return f"layer {numbers[-1]}" if numbers else layer


def plot_probe(result: Any, path: str | Path, title: str | None = None) -> Path:
    """Per MoE layer, each expert's accuracy alone vs the MoE's on its allocated samples (bars), with the sample
    counts (`hf_moekd.analysis.probe_experts`)."""
    layers = result.layers()
    per_layer = max(len(result.rows) // len(layers), 1)
    fig, axes = _figure(len(layers), 1, max(6.0, 0.7 * per_layer + 2), 2.6 * len(layers))
    for ax, layer in zip(axes[:, 0], layers):
        rows = [r for r in result.rows if r.layer == layer]
        x = torch.arange(len(rows)).numpy()
        ax.bar(x - 0.2, [100 * (r.model_accuracy or 0) for r in rows], 0.4, label="MoE", color="#9db4d6")
        ax.bar(x + 0.2, [100 * (r.probe_accuracy or 0) for r in rows], 0.4, label="expert alone", color="#2b5c9e")
        for xi, r in zip(x, rows):
            ax.text(xi, 101, f"n={r.samples}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(x, [str(r.expert) for r in rows])
        ax.set_ylim(0, 112)
        ax.set_ylabel("accuracy %")
        ax.set_title(f"{layer}", fontsize=9)
    axes[-1, 0].set_xlabel("expert (samples allocated by top-1 majority)")
    axes[0, 0].legend(loc="lower right", fontsize=8)
    return _save(fig, path, title)


def plot_loss_terms(log_history: Sequence[Mapping[str, Any]], path: str | Path,
                    weights: Mapping[str, float] | None = None, title: str | None = None) -> Path:
    """Training curves from a Trainer's `state.log_history`: the total `loss` (with `eval_loss` where evaluated) and
    each `loss_<term>` a `DistillationTrainer` logs (unweighted; `weights`, e.g. `trainer.loss_weights`, go in the
    panel titles), one panel each, against the optimizer step."""
    train = [row for row in log_history if "loss" in row]
    if not train:
        raise ValueError("the log history has no training loss (training ran fewer steps than --logging_steps)")
    keys = ["loss", *dict.fromkeys(k for row in train for k in row if k.startswith("loss_"))]
    rows, cols = _grid(len(keys), 3)
    fig, axes = _figure(rows, cols, 4.2 * cols, 3.0 * rows)
    for ax, key in zip(axes.flat, keys):
        points = [(row["step"], row[key]) for row in train if key in row]
        ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, markersize=3, label="train")
        evals = [(row["step"], row["eval_loss"]) for row in log_history if key == "loss" and "eval_loss" in row]
        if evals:
            ax.plot(*zip(*evals), marker="s", markersize=4, linestyle="--", label="eval")
            ax.legend(fontsize=8)
        name = key.removeprefix("loss_")
        weight = (weights or {}).get(name)
        ax.set_title("total loss" if key == "loss" else name + ("" if weight is None else f" (weight {weight:g})"),
                     fontsize=10)
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.set_xlabel("step")
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    return _save(fig, path, title)


def plot_routing(counts: Mapping[str, torch.Tensor], path: str | Path, title: str | None = None) -> Path:
    """Routing histograms: per MoE layer, each expert's share of the routed tokens (`routing_counts`), with the
    uniform share dashed."""
    if not counts:
        raise ValueError("plot_routing needs the token counts of at least one MoE layer")
    rows, cols = _grid(len(counts), 4)
    fig, axes = _figure(rows, cols, 3.2 * cols, 2.6 * rows)
    for ax, (layer, layer_counts) in zip(axes.flat, counts.items()):
        share = 100 * layer_counts.double() / max(int(layer_counts.sum()), 1)
        ax.bar(range(len(share)), share.numpy(), color="#2b5c9e")
        ax.axhline(100 / len(share), color="grey", linestyle="--", linewidth=1)
        ax.set_title(f"{_short(layer)} ({int(layer_counts.sum()):,} tokens)", fontsize=9)
        ax.set_xticks(range(len(share)))
        ax.set_xlabel("expert")
        ax.set_ylabel("% of tokens")
    for ax in list(axes.flat)[len(counts):]:
        ax.set_visible(False)
    return _save(fig, path, title)


def plot_spectra(spectra: Mapping[str, Mapping[str, torch.Tensor]], path: str | Path, rank: int | None = None,
                 title: str | None = None) -> Path:
    """Singular values of the experts' matrices, one panel per projection and one line per layer (mean over the
    experts, shaded from the smallest to the largest), log scale; `rank` is marked. `spectra` maps layer ->
    projection -> `[E, r]` descending singular values (`hf_moekd.ones.expert_spectra`)."""
    if not spectra:
        raise ValueError("plot_spectra needs the spectra of at least one layer")
    from matplotlib import colormaps, colors

    projections = list(dict.fromkeys(p for layer in spectra.values() for p in layer))
    fig, axes = _figure(1, len(projections), 4.5 * len(projections), 3.6)
    cmap, norm = colormaps["viridis"], colors.Normalize(0, max(len(spectra) - 1, 1))
    for ax, proj in zip(axes[0], projections):
        for i, (layer, values) in enumerate(spectra.items()):
            if proj not in values:
                continue
            s = values[proj].double()
            x = range(1, s.shape[-1] + 1)
            ax.plot(x, s.mean(0).numpy(), color=cmap(norm(i)), linewidth=1.2, label=_short(layer))
            ax.fill_between(x, s.min(0).values.numpy(), s.max(0).values.numpy(), color=cmap(norm(i)), alpha=0.15)
        if rank:
            ax.axvline(rank, color="red", linestyle="--", linewidth=1, label=f"rank {rank}")
        ax.set_yscale("log")
        ax.set_title(f"{proj} projection", fontsize=10)
        ax.set_xlabel("singular value index")
    axes[0, 0].set_ylabel("singular value")
    if len(spectra) <= 10:
        axes[0, -1].legend(fontsize=7)
    else:
        from matplotlib.cm import ScalarMappable

        fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes[0, -1], label="layer (forward order)")
    return _save(fig, path, title)


__all__ = ["plot_loss_terms", "plot_probe", "plot_routing", "plot_spectra"]
