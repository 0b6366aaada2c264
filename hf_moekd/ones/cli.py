"""`hf-moekd gather TEACHER OUTPUT ...`: the knowledge-gathering subcommand (wired in by hf_moekd.cli)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .strategies import MERGE_STRATEGIES, SVD_METHODS


def add_gather_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``gather`` subcommand to an ``argparse`` subparsers object; sets ``func``."""
    p = subparsers.add_parser("gather", help="Merge a sparse MoE's experts into a dense twin model (OneS knowledge gathering).")
    p.add_argument("teacher", metavar="TEACHER", help="MoE checkpoint directory (safetensors)")
    p.add_argument("output", metavar="OUTPUT", help="directory for the dense model (written atomically)")
    p.add_argument("--strategy", default=None, choices=sorted(MERGE_STRATEGIES),
                   help="merge strategy (default: svd when --rank is given, else weighted_average, the usage-weighted "
                        "mean of the experts)")
    p.add_argument("--rank", type=int, default=None, help="SVD-KG rank per expert (svd only; default: min(hidden, intermediate) // experts)")
    p.add_argument("--svd_method", default=None, choices=sorted(SVD_METHODS), help="SVD-KG merge formula (default: expert)")
    p.add_argument("--top_k", type=int, default=None, help="experts kept by --strategy top_experts (default: the router's top-k)")
    p.add_argument("--align", action="store_true", help="align hidden units across experts before merging")
    p.add_argument("--calibration_data", default=None,
                   help="token batches for router statistics: a .pt file (tensor or list of tensors), a .txt/.jsonl "
                        "file of texts (tokenized with TEACHER's tokenizer) or a datasets directory with input_ids")
    p.add_argument("--num_calibration_samples", type=int, default=128, help="texts/rows used from --calibration_data")
    p.add_argument("--max_length", type=int, default=512, help="tokens per calibration text")
    p.add_argument("--max_shard_size", default="2GB", help="output shard size (default: 2GB)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument("--allow_pickle", action="store_true",
                   help="accept a TEACHER with only pickle weights (pytorch_model.bin); only for files you trust")
    p.add_argument("--plot_spectra", metavar="DIR", default=None,
                   help="save DIR/singular_values.png: the singular values of every expert matrix per layer (computed "
                        "once from the experts read for merging; helps choose --rank)")
    p.set_defaults(func=run_gather)
    return p


def load_calibration(path: str, teacher: str, n: int, max_length: int) -> list:
    """Calibration batches from a .pt / .txt / .jsonl file or a saved datasets directory."""
    import torch

    src = Path(path)
    if src.is_dir():
        from datasets import load_from_disk

        ds = load_from_disk(str(src))
        return [{k: row[k] for k in ("input_ids", "attention_mask") if k in row} for row in ds.select(range(min(n, len(ds))))]
    if src.suffix in (".pt", ".pth"):
        data = torch.load(src, weights_only=True)
        return [data] if isinstance(data, torch.Tensor) else list(data)[:n]
    if src.suffix in (".txt", ".jsonl"):
        from transformers import AutoTokenizer

        lines = [ln for ln in src.read_text().splitlines() if ln.strip()][:n]
        texts = [json.loads(ln)["text"] for ln in lines] if src.suffix == ".jsonl" else lines
        tok = AutoTokenizer.from_pretrained(teacher)
        return [tok(t, return_tensors="pt", truncation=True, max_length=max_length)["input_ids"] for t in texts]
    raise ValueError(f"unsupported --calibration_data {path}: use a .pt, .txt or .jsonl file or a datasets directory")


def run_gather(ns: argparse.Namespace) -> None:
    from .gather import gather_experts

    kwargs = {k: v for k, v in {"method": ns.svd_method, "k": ns.top_k}.items() if v is not None}
    calib = None if ns.calibration_data is None else load_calibration(
        ns.calibration_data, ns.teacher, ns.num_calibration_samples, ns.max_length)
    spectra = None if ns.plot_spectra is None else {}
    strategy = ns.strategy or ("svd" if ns.rank is not None else "weighted_average")
    out = gather_experts(ns.teacher, strategy=strategy, rank=ns.rank, calibration_dataset=calib, align=ns.align,
                         output_dir=ns.output, strategy_kwargs=kwargs, max_shard_size=ns.max_shard_size,
                         overwrite=ns.overwrite, return_model=False, allow_pickle=ns.allow_pickle, spectra=spectra)
    print(f"dense model written to {out}")
    if spectra is not None:
        from ..utils.plots import plot_spectra

        path = plot_spectra(spectra, Path(ns.plot_spectra) / "singular_values.png", rank=ns.rank,
                            title=f"expert singular values: {Path(ns.teacher).name}")
        print(f"singular-value spectra written to {path}")
