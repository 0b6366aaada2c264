"""`hf-moekd` command line."""
from __future__ import annotations

import argparse

from .recipes import run


def _demo(ns: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(output_dir=ns.output_dir, seeds=tuple(ns.seeds), epochs=ns.epochs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-moekd", description="Knowledge distillation between MoE and dense models.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="Distil a ViT on scikit-learn digits and print a results table (no arguments needed).")
    demo.add_argument("--output_dir", default="outputs/demo", help="where the distilled student is saved")
    demo.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="student seeds")
    demo.add_argument("--epochs", type=float, default=15, help="training epochs of every model")
    demo.set_defaults(func=_demo)
    from .gathering.cli import add_gather_parser

    add_gather_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    ns = build_parser().parse_args(argv)
    run(lambda: ns.func(ns))


if __name__ == "__main__":
    main()
