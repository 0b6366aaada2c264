"""The `hf-moekd` launcher: answers `hf-moekd [COMMAND] --help` from the help texts saved with the package
(`hf_moekd/cli_help.json`, rendered from the argument parsers by `utils/cli_reference.py` and checked against them by
the tests) without importing hf_moekd, whose import registers its models with transformers and so loads torch
(seconds). Every other command line goes to `hf_moekd.cli.main`."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

HELP_FILE = "cli_help.json"
HELP_FLAGS = ("-h", "--help")


def saved_help(argv: list[str]) -> str | None:
    """The saved help text for `argv` when it only asks for help (`--help`, `COMMAND --help`), else None."""
    if len(argv) == 1 and argv[0] in HELP_FLAGS:
        key = "hf-moekd"
    elif len(argv) == 2 and argv[1] in HELP_FLAGS:
        key = argv[0]
    else:
        return None
    spec = importlib.util.find_spec("hf_moekd")  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    try:
        texts = json.loads((Path(next(iter(spec.submodule_search_locations))) / HELP_FILE).read_text())
    except (OSError, ValueError):
        return None
    return texts.get(key)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    text = saved_help(argv)
    if text is not None:
        sys.stdout.write(text)
        return
    from hf_moekd.cli import main as run_command

    run_command(argv)


if __name__ == "__main__":
    main()
