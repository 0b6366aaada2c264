"""The test helpers' own rules: the tests that need the benchmark data skip without it, but fail in CI."""
from __future__ import annotations

import pytest
from testing_utils import benchmark_data_dir


def test_missing_benchmark_data_skips_outside_ci(tmp_path):
    with pytest.raises(pytest.skip.Exception, match="HF_MOEKD_DATA_DIR"):
        benchmark_data_dir({"HF_MOEKD_DATA_DIR": str(tmp_path / "nowhere")})


@pytest.mark.parametrize("ci", ["true", "1"])
def test_missing_benchmark_data_fails_in_ci(tmp_path, ci):
    (tmp_path / "glue").mkdir()
    with pytest.raises(pytest.fail.Exception, match=r"has no conll2003/.*CI=true"):
        benchmark_data_dir({"HF_MOEKD_DATA_DIR": str(tmp_path), "CI": ci})


def test_benchmark_data_folder_is_returned(tmp_path):
    for name in ("glue", "conll2003"):
        (tmp_path / name).mkdir()
    assert benchmark_data_dir({"HF_MOEKD_DATA_DIR": str(tmp_path), "CI": "true"}) == tmp_path
