"""Shared pytest fixtures."""

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Benchmark data folder holding glue/ and conll2003/: $HF_MOEKD_DATA_DIR, else shared/data beside the repo."""
    default = Path(__file__).resolve().parents[2] / "shared" / "data"
    path = Path(os.environ.get("HF_MOEKD_DATA_DIR", default))
    if not path.is_dir():
        pytest.skip(
            f"benchmark data not found at {path}; set HF_MOEKD_DATA_DIR to the folder holding glue/ and conll2003/"
        )
    return path
