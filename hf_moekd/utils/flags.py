"""Subcommand flags: the dataclass values of a parsed subcommand (`dataclass_values`), and former flag spellings,
still accepted for one release with a FutureWarning (`add_renamed_flags`)."""
from __future__ import annotations

import argparse
import warnings


class _Renamed(argparse.Action):
    """A former spelling: parses as the new flag does, warns, and stores into the new flag's destination."""

    def __init__(self, *args, new: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        warnings.warn(f"{option_string} is renamed {self.new}; the old spelling will be removed in the next release",
                      FutureWarning, stacklevel=2)
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


def add_renamed_flags(parser: argparse.ArgumentParser, renamed: dict[str, str]) -> None:
    """Accept each ``old`` flag of ``{old: new}`` as ``new`` (hidden from --help); ``new`` must be defined already."""
    for old, new in renamed.items():
        target = parser._option_string_actions[new]
        switch = target.nargs == "?" and target.const is True  # a former store_true flag takes no value
        parser.add_argument(old, dest=target.dest, nargs=0 if switch else target.nargs, const=target.const,
                            type=target.type, default=argparse.SUPPRESS, help=argparse.SUPPRESS, action=_Renamed,
                            new=new)


SUBCOMMAND_ENTRIES = ("command", "func", "parser")  # what the `hf-moekd` parser itself adds to the namespace


def dataclass_values(ns: argparse.Namespace, *own: str) -> dict:
    """The flags of a subcommand built from an `HfArgumentParser` (`ns.parser`), for its `parse_dict`: the namespace
    without the entries of the top-level parser and the subcommand's `own` (positional) arguments."""
    skip = {*SUBCOMMAND_ENTRIES, *own}
    return {k: v for k, v in vars(ns).items() if k not in skip}
