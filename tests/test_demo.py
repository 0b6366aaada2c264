"""The main job (`python3 dev.py main` -> `hf-moekd demo`) at a tiny budget, and the CLI surface."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from transformers import AutoModelForImageClassification

from hf_moekd.cli import build_parser, main
from hf_moekd.studies.demo import run_demo
from hf_moekd.data.images import load_digits_splits

ROOT = Path(__file__).resolve().parents[1]


def test_digits_splits_are_stratified_and_disjoint():
    data = load_digits_splits()
    assert len(data["train"]) + len(data["test"]) == 1797
    assert data["train"][0]["pixel_values"].shape == (1, 8, 8)
    assert sorted({int(y) for y in data["test"]["labels"]}) == list(range(10))


@pytest.mark.slow
def test_demo_prints_table_and_saves_reloadable_ones_model(tmp_path, capsys):
    report = run_demo(output_dir=str(tmp_path / "demo"), seeds=(0,), epochs=1, kd_epochs=1)
    out = capsys.readouterr().out
    assert {"dense", "moe", "svd gathered only", "svd + KD (OneS)"} <= set(report.accuracy)  # SVD-KG, the paper's
    assert re.search(r"\| svd \+ KD \(OneS\) \|", out) and "Inference on CPU, dense vs MoE" in out
    assert report.latency_ms["moe_batch64"] > 0
    model = AutoModelForImageClassification.from_pretrained(tmp_path / "demo")
    assert model.config.model_type == "dense_vit" and model.config.num_labels == 10
    run_demo(output_dir=str(tmp_path / "demo"), seeds=(0,), epochs=0.2, kd_epochs=0.2)  # a second run replaces it
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not a demo output")
    with pytest.raises(FileExistsError, match="not empty"):
        run_demo(output_dir=str(tmp_path / "mine"), seeds=(0,), epochs=0.2, kd_epochs=0.2)
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_cli_help_and_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0 and "demo" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        build_parser().parse_args(["nope"])


def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_one():
    commands = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("python3 dev.py")]
    assert [c.split("#")[0].strip() for c in commands[:2]] == ["python3 dev.py main", "python3 dev.py test"]
    assert "python3 dev.py test" in (ROOT / ".ci" / "run").read_text()
