"""`hf-moekd` command line."""
from __future__ import annotations

import argparse

from .recipes import run


def _demo(ns: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(output_dir=ns.output_dir, seeds=tuple(ns.seeds), epochs=ns.epochs, kd_epochs=ns.kd_epochs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-moekd", description="Knowledge distillation between MoE and dense models.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="OneS on scikit-learn digits: V-MoE -> gathered dense model -> KD; prints a "
                                       "results table (no arguments needed).")
    demo.add_argument("--output_dir", default="outputs/demo", help="where the OneS model is saved (replaced)")
    demo.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (each trains every model)")
    demo.add_argument("--epochs", type=float, default=20, help="training epochs of the dense baseline and the V-MoE")
    demo.add_argument("--kd_epochs", type=float, default=10, help="distillation epochs of the gathered model")
    demo.set_defaults(func=_demo)
    from .cards.cli import add_card_parser
    from .gathering.cli import add_gather_parser

    add_gather_parser(sub)
    add_card_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    ns = build_parser().parse_args(argv)
    run(lambda: ns.func(ns))


if __name__ == "__main__":
    main()
