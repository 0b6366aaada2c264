"""Check that code marked `# Copied from <module.object>[ with Old->New[,Old2->New2...]]` in hf_moekd/models is still
identical to its source (as transformers' utils/check_copies.py does): model folders ship with checkpoints through
`auto_map`, so they keep their own copies instead of importing each other, and this check keeps the copies from
drifting apart. The mark stands right above the copied def or class (above its decorators, if any); the replacements
are applied to the source, in order, before comparing.

    python utils/check_copies.py          # lists drifted copies, exit 1 if any
"""
from __future__ import annotations

import ast
import importlib
import inspect
import re
import sys
import textwrap
from pathlib import Path

MARK = re.compile(r"^\s*# Copied from ([\w.]+)(?: with (\w+->\w+(?:,\s*\w+->\w+)*))?\s*$")


def _target_source(dotted: str) -> str:
    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return textwrap.dedent(inspect.getsource(obj))
    raise ImportError(f"cannot import {dotted}")


def drifted_copies(text: str, filename: str = "<text>") -> list[str]:
    """`file:line target` for each marked copy in `text` (a module's source) that differs from its target."""
    lines = text.splitlines()
    nodes = {min([n.lineno, *(d.lineno for d in n.decorator_list)]): n for n in ast.walk(ast.parse(text))
             if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    problems = []
    for i, line in enumerate(lines, start=1):
        if not (match := MARK.match(line)):
            continue
        node = nodes.get(i + 1)
        if node is None:
            problems.append(f"{filename}:{i} the '# Copied from' line is not right above a def or class")
            continue
        copy = textwrap.dedent("\n".join(lines[i:node.end_lineno])) + "\n"
        source = _target_source(match[1])
        for old, new in (pair.strip().split("->") for pair in (match[2] or "").split(",") if pair):
            source = source.replace(old, new)
        if copy.rstrip() != source.rstrip():
            problems.append(f"{filename}:{i} differs from {match[1]}")
    return problems


def main(root: Path = Path(__file__).resolve().parents[1] / "hf_moekd" / "models") -> int:
    problems = [p for file in sorted(root.rglob("*.py")) for p in drifted_copies(file.read_text(), str(file))]
    print("\n".join(problems) or "all copies are identical to their sources")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
