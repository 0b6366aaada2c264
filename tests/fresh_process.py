"""Run a saved checkpoint in a fresh interpreter that never imports hf_moekd (stock transformers only)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

SCRIPT = textwrap.dedent(
    """
    import sys, torch
    import transformers
    model = getattr(transformers, sys.argv[1]).from_pretrained(sys.argv[2], trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(**torch.load("inputs.pt")).logits
    assert "hf_moekd" not in sys.modules, "hf_moekd was imported"
    torch.save({"logits": logits, "module": type(model).__module__, "class": type(model).__name__}, "out.pt")
    """
)


def fresh_process_logits(checkpoint: Path, auto_class: str, inputs: dict[str, torch.Tensor], workdir: Path) -> dict:
    """Logits, module and class name of `auto_class.from_pretrained(checkpoint, trust_remote_code=True)`."""
    torch.save(inputs, workdir / "inputs.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(workdir / "modules"), "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run([sys.executable, "-c", SCRIPT, auto_class, str(checkpoint)], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(workdir / "out.pt")
