"""Two CPU processes (gloo) give the loss and weights of one process with the same global batch."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("dist_kd_run.py")
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], out: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_processes_match_one(tmp_path, launcher):
    single = run([sys.executable, str(SCRIPT), str(tmp_path / "one"), "8"], tmp_path / "one")
    port = str(free_port())
    if launcher == "torchrun":
        cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", port]
    else:  # `--cpu --num_processes 2` silently runs one process; --multi_gpu (no GPU present: gloo on CPU) forks two
        cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port]
    double = run([*cmd, str(SCRIPT), str(tmp_path / "two"), "4"], tmp_path / "two")
    assert single["world_size"] == 1 and double["world_size"] == 2
    assert double["losses"] == pytest.approx(single["losses"], rel=1e-5)
    for a, b in zip(single["terms"], double["terms"]):
        assert a == pytest.approx(b, rel=1e-4)
    for name, values in single["params"].items():  # includes the hidden-state projection (outside DDP)
        assert double["params"][name] == pytest.approx(values, rel=1e-4, abs=1e-6), name
