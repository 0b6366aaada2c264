"""`hf-moekd card OUTPUT_DIR`: (re)write a saved model's card (wired in by hf_moekd.cli)."""
from __future__ import annotations

import argparse
from typing import Any



def add_card_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``card`` subcommand to an ``argparse`` subparsers object; sets ``func``."""
    p = subparsers.add_parser(
        "card", help="Write the model card (README.md) of a saved model folder from its config.json and "
                     "all_results.json.",
        description="Write OUTPUT_DIR/README.md: Hub metadata (library_name, tags, datasets, metrics, base_model) and "
                    "the method, teacher, data, hyperparameters, measured metrics, parameter count, inference speed "
                    "and how to load the model. Runs write it themselves; use this after editing all_results.json, "
                    "for folders from older versions, or to set --model_id before uploading.")
    p.add_argument("output_dir", metavar="OUTPUT_DIR", help="a saved model folder (config.json + weights)")
    p.add_argument("--method",
                   help="the method described first, e.g. kd, fine-tune, ones, gathering, minimoe, opdf, mode, m2mkd "
                        "(default: the one recorded in all_results.json; needed when the folder records none)")
    p.add_argument("--model_id", default=None,
                   help="Hub repo id used in the loading snippet (default: the folder name)")
    p.set_defaults(func=run_card)
    return p


def run_card(ns: argparse.Namespace) -> None:
    from .render import write_model_card

    print(f"model card written to {write_model_card(ns.output_dir, method=ns.method, model_id=ns.model_id)}")
