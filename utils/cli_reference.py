"""Render `hf-moekd`'s help from the argument parsers, the one source of the command line's texts: writes
`hf_moekd/cli_help.json` (what the launcher prints for `--help` without importing the package) and `docs/cli.md` (the
command-line reference). The tests fail when either differs from the parsers.

    python utils/cli_reference.py           # rewrite both
    python utils/cli_reference.py --check   # exit 1 when either is stale
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HELP_JSON = ROOT / "hf_moekd" / "cli_help.json"
DOCS = ROOT / "docs" / "cli.md"
WIDTH = 100  # columns the texts are wrapped to


def render() -> dict[str, str]:
    """`{"hf-moekd": top-level help, COMMAND: its help}` formatted by argparse at `WIDTH` columns."""
    os.environ["COLUMNS"] = str(WIDTH)
    from hf_moekd.cli import build_parser

    parser = build_parser()
    texts = {"hf-moekd": parser.format_help()}
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    texts.update({name: sub.format_help() for name, sub in commands.choices.items()})
    return texts


def markdown(texts: dict[str, str]) -> str:
    parts = ["# Command line", "",
             "Generated from the argument parsers by `python utils/cli_reference.py`: each section is what "
             "`hf-moekd [COMMAND] --help` prints. `hf-moekd distill --help_all` adds every "
             "`transformers.TrainingArguments` flag.", ""]
    for name, text in texts.items():
        parts += [f"## `{name if name == 'hf-moekd' else 'hf-moekd ' + name}`", "", "```text", text.rstrip(), "```", ""]
    return "\n".join(parts)


def outputs() -> dict[Path, str]:
    texts = render()
    return {HELP_JSON: json.dumps(texts, indent=1, ensure_ascii=False) + "\n", DOCS: markdown(texts)}


def main(argv: list[str]) -> int:
    stale = [path for path, text in outputs().items() if not path.is_file() or path.read_text() != text]
    if "--check" in argv:
        for path in stale:
            print(f"{path.relative_to(ROOT)} differs from the parsers: run python utils/cli_reference.py")
        return 1 if stale else 0
    for path, text in outputs().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
