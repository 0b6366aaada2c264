"""benchmarks/common.py: concurrent training runs (--workers) and the provenance read off the runs' results."""
import json
import os
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
common = pytest.importorskip("common")

# A stand-in for an example script: writes all_results.json with its OMP_NUM_THREADS, after a delay.
SCRIPT = ("import json, os, sys, time, pathlib; out = pathlib.Path(sys.argv[1]); time.sleep(float(sys.argv[2])); "
          "out.mkdir(parents=True, exist_ok=True); (out / 'all_results.json').write_text(json.dumps("
          "{'threads': os.environ.get('OMP_NUM_THREADS'), 'name': out.name}))")


def test_in_parallel_keeps_the_order_and_runs_at_once():
    together = threading.Barrier(3, timeout=30)  # passes only when all three items run at the same time
    assert common.in_parallel(lambda x: (together.wait(), x * 2)[1], [3, 1, 2], workers=3) == [6, 2, 4]
    assert common.in_parallel(lambda x: x * 2, [3, 1], workers=1) == [6, 2]


def test_run_scripts_runs_missing_jobs_with_a_share_of_the_threads(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    done = tmp_path / "done"
    done.mkdir()
    (done / "all_results.json").write_text(json.dumps({"name": "cached"}))
    jobs = [([sys.executable, "-c", SCRIPT, str(tmp_path / name), delay], tmp_path / name)
            for name, delay in (("slow", "0.5"), ("fast", "0"))]
    results = common.run_scripts([*jobs, ([sys.executable, "-c", "raise SystemExit(1)"], done)], "test", workers=2)
    threads = str(max(1, (os.cpu_count() or 1) // 2))
    assert results == [{"threads": threads, "name": "slow"}, {"threads": threads, "name": "fast"}, {"name": "cached"}]
    alone = common.run_scripts([([sys.executable, "-c", SCRIPT, str(tmp_path / "one"), "0"], tmp_path / "one")], "t")
    assert alone == [{"threads": None, "name": "one"}]  # one run: torch's default threads


def test_run_scripts_refuses_a_run_of_another_kind(tmp_path):
    (tmp_path / "all_results.json").write_text(json.dumps({"run_kind": "fine-tune"}))
    job = ([sys.executable, "-c", "raise SystemExit(1)"], tmp_path)
    assert common.run_scripts([job], "t") == [{"run_kind": "fine-tune"}]
    with pytest.raises(RuntimeError, match="did not distil; delete it and rerun"):
        common.run_scripts([job], "t", run_kind="distil")


def test_run_facts_read_off_the_results(tmp_path):
    results = {"epoch": 3.0, "train_runtime": 12.1, "train_samples_per_second": 4000 * 3 / 12.1,
               "model_card": {"device": "NVIDIA H200",
                              "hyperparameters": {"learning_rate": 1e-4, "total_train_batch_size": 32}}}
    (tmp_path / "all_results.json").write_text(json.dumps(results))
    assert common.teacher_budget(tmp_path) == "4000 train examples, 3 epochs, lr 0.0001, batch 32, on NVIDIA H200"
    assert common.teacher_budget(tmp_path / "missing") is None
    assert common.run_devices([results, {"model_card": {"device": "cpu"}}, results]) == ["NVIDIA H200", "cpu"]
