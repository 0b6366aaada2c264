"""Shared pytest fixtures (helpers are in testing_utils.py)."""

import pytest
from testing_utils import benchmark_data_dir


@pytest.fixture(scope="session")
def data_dir():
    """Benchmark data folder holding glue/ and conll2003/: $HF_MOEKD_DATA_DIR, else shared/data beside the repo.
    Missing, the tests that need it skip, except in CI (CI=true), where they fail."""
    return benchmark_data_dir()
