"""Helpers shared by the benchmark scripts: provenance, result files, mean/spread."""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"


def environment() -> dict[str, Any]:
    """Versions and machine, recorded with every result."""
    return {
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_count": os.cpu_count(),
        "versions": {p: version(p) for p in ("torch", "transformers", "accelerate", "datasets", "hf_moekd")},
    }


def mean_std(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
        "values": values,
    }


def same_experiment(saved: dict, current: dict) -> bool:
    """Saved per-seed results are reused when every setting that shapes them is unchanged (fields added later
    to OneSArguments and the output/speed options do not count)."""
    current = json.loads(json.dumps(current))
    skip = {"output_dir", "overwrite_output_dir", "measure_speed"}
    return all(saved[k] == v for k, v in current.items() if k in saved and k not in skip)


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temporary file, then rename): a killed benchmark never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def write_result(name: str, payload: dict[str, Any]) -> Path:
    """Write `benchmarks/results/<name>.json` and print the headline as the last output line."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "command": " ".join([Path(sys.executable).name, *sys.argv]), **payload,
               "environment": environment()}
    path = RESULTS / f"{name}.json"
    write_json(path, payload)
    print(json.dumps(payload.get("headline", payload)))
    return path
