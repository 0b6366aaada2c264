"""`hf-moekd gather TEACHER OUTPUT ...`: the knowledge-gathering subcommand (wired in by hf_moekd.cli).

Its flags are the fields of `GatherArguments` (input, output, calibration) and of `GatheringConfig` (the merge: the
keyword arguments of `gather_experts`), parsed by `transformers.HfArgumentParser`.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..utils.flags import add_renamed_flags, dataclass_values
from .config import GatheringConfig

# former spellings (accepted with a FutureWarning until the next release) -> the flags named as distill / the API
RENAMED_FLAGS = {"--overwrite": "--overwrite_output_dir", "--allow_pickle": "--allow_pickle_checkpoints",
                 "--calibration_data": "--calibration_dataset", "--max_length": "--max_seq_length"}


@dataclass
class GatherArguments:
    """What `hf-moekd gather` reads and writes (the merge itself is a `GatheringConfig`)."""

    model_name_or_path: str | None = field(default=None, metadata={
        "help": "The MoE checkpoint directory (safetensors) or a peft adapter folder; or the positional TEACHER."})
    output_dir: str | None = field(default=None, metadata={
        "help": "Directory for the dense model (written atomically); or the positional OUTPUT."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace the output directory if it exists."})
    allow_pickle_checkpoints: bool = field(default=False, metadata={
        "help": "Accept a teacher with only pickle weights (pytorch_model.bin); only for files you trust."})
    calibration_dataset: str | None = field(default=None, metadata={
        "help": "Token batches for router statistics: a .pt file (tensor or list of tensors), a .txt/.jsonl file of "
                "texts (tokenized with the teacher's tokenizer) or a datasets directory with input_ids."})
    num_calibration_samples: int = field(default=128, metadata={"help": "Texts/rows used from --calibration_dataset."})
    max_seq_length: int = field(default=512, metadata={"help": "Tokens per calibration text (longer ones are cut)."})
    max_shard_size: str = field(default="2GB", metadata={"help": "Output shard size."})
    plot_spectra: str | None = field(default=None, metadata={
        "metavar": "DIR", "help": "Save DIR/singular_values.png: the singular values of every expert matrix per layer "
                                  "(computed once from the experts read for merging; helps choose --rank)."})


def add_gather_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``gather`` subcommand to an ``argparse`` subparsers object; sets ``func``."""
    from transformers import HfArgumentParser

    flags = HfArgumentParser((GatherArguments, GatheringConfig), add_help=False)
    p = subparsers.add_parser(
        "gather", parents=[flags],
        help="Merge a sparse MoE's experts into a dense twin model (OneS knowledge gathering).",
        description="Merge each sparse block's experts into one dense FFN and write the dense twin model. The merge "
                    "flags (--strategy, --rank, --top_k, --svd_method, --granularity, --units, --keep_fraction, "
                    "--align) are gather_experts' keyword arguments.",
        epilog="example: hf-moekd gather path/to/mixtral out/dense --strategy svd --rank 256 --overwrite_output_dir")
    p.add_argument("teacher", metavar="TEACHER", nargs="?", help="MoE checkpoint directory (or --model_name_or_path)")
    p.add_argument("output", metavar="OUTPUT", nargs="?", help="directory for the dense model (or --output_dir)")
    add_renamed_flags(p, RENAMED_FLAGS)
    p.set_defaults(func=run_gather, parser=flags)
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
    raise ValueError(f"unsupported --calibration_dataset {path}: use a .pt, .txt or .jsonl file or a datasets directory")


def parse_gather_arguments(ns: argparse.Namespace) -> tuple[GatherArguments, GatheringConfig]:
    """The dataclasses of a parsed `hf-moekd gather` command line (positional TEACHER / OUTPUT folded in)."""
    values = dataclass_values(ns, "teacher", "output")
    pairs = (("TEACHER", ns.teacher, "model_name_or_path"), ("OUTPUT", ns.output, "output_dir"))
    for metavar, positional, name in pairs:
        if positional is not None and values[name] is not None and positional != values[name]:
            raise ValueError(f"gather got {metavar} {positional!r} and --{name} {values[name]!r}: give one of them")
        values[name] = values[name] or positional
        if values[name] is None:
            raise ValueError(f"gather needs {metavar} (or --{name})")
    return ns.parser.parse_dict(values)


def run_gather(ns: argparse.Namespace) -> None:
    from .gather import gather_experts

    args, gathering = parse_gather_arguments(ns)
    calib = None if args.calibration_dataset is None else load_calibration(
        args.calibration_dataset, args.model_name_or_path, args.num_calibration_samples, args.max_seq_length)
    spectra = None if args.plot_spectra is None else {}
    out = gather_experts(args.model_name_or_path, gathering, calibration_dataset=calib, output_dir=args.output_dir,
                         max_shard_size=args.max_shard_size, overwrite=args.overwrite_output_dir, return_model=False,
                         allow_pickle=args.allow_pickle_checkpoints, spectra=spectra)
    print(f"dense model written to {out}")
    if spectra is not None:
        from ..utils.plots import plot_spectra

        path = plot_spectra(spectra, Path(args.plot_spectra) / "singular_values.png", rank=gathering.rank,
                            title=f"expert singular values: {Path(args.model_name_or_path).name}")
        print(f"singular-value spectra written to {path}")
