"""The main job's embedded default: OneS on scikit-learn digits.

Trains a dense ViT baseline and a V-MoE teacher (8 experts, top-2, every other block), gathers the teacher's
experts into a dense OneS model (SVD-KG), distils it from the teacher (logits + hidden states), prints the
comparison table (with the controls and the dense-vs-MoE inference speedup) and saves the OneS model, which
reloads with `AutoModelForImageClassification.from_pretrained`. A few minutes on 2 free CPU cores.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..ones.card import DENSE_MODEL_TYPES
from .ones import OneSArguments, OneSReport, print_report, run_ones


def is_previous_output(output_dir: str | Path) -> bool:
    """True for a folder written by an earlier run of the pipeline (a OneS model with its per-seed results; a
    model from `hf-moekd gather` has results without them)."""
    folder = Path(output_dir)
    try:
        config = json.loads((folder / "config.json").read_text())
        results = json.loads((folder / "all_results.json").read_text())
    except (OSError, ValueError):
        return False
    return config.get("model_type") in DENSE_MODEL_TYPES and isinstance(results, dict) and "per_seed" in results


def run_demo(output_dir: str = "outputs/demo", seeds: tuple[int, ...] = (0, 1, 2), epochs: float = 20,
             kd_epochs: float = 10) -> OneSReport:
    """Run the OneS pipeline on digits with the defaults of `OneSArguments`.

    `output_dir` is replaced only when it is empty or holds an earlier demo output; any other non-empty folder
    is refused before training starts."""
    args = OneSArguments(output_dir=output_dir, overwrite_output_dir=is_previous_output(output_dir),
                         seeds=list(seeds), epochs=epochs, kd_epochs=kd_epochs)
    report = run_ones(args)
    print_report(report)
    return report
