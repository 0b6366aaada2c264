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
    assert_prints_what_the_docs_show(out)
    assert report.latency_ms["moe_batch64"] > 0
    model = AutoModelForImageClassification.from_pretrained(tmp_path / "demo")
    assert model.config.model_type == "dense_vit" and model.config.num_labels == 10
    run_demo(output_dir=str(tmp_path / "demo"), seeds=(0,), epochs=0.2, kd_epochs=0.2)  # a second run replaces it
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not a demo output")
    with pytest.raises(FileExistsError, match="not empty"):
        run_demo(output_dir=str(tmp_path / "mine"), seeds=(0,), epochs=0.2, kd_epochs=0.2)
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def documented_output() -> list[str]:
    """The lines docs/main-job.md shows as the main job's output (`…` stands for a measured value)."""
    page = (ROOT / "docs" / "main-job.md").read_text()
    block = page.split("<!-- main-job-output:start -->", 1)[1].split("<!-- main-job-output:end -->", 1)[0]
    return [line for line in block.strip().strip("`").removeprefix("text").splitlines() if line.strip()]


def assert_prints_what_the_docs_show(out: str) -> None:
    """Every documented line matches a printed line, in order; `…` matches any value."""
    printed = [line for line in out.splitlines() if line.strip()]
    position = 0
    for line in documented_output():
        pattern = re.compile("^" + ".+?".join(map(re.escape, line.split("…"))) + "$")
        found = next((i for i in range(position, len(printed)) if pattern.match(printed[i])), None)
        assert found is not None, f"docs/main-job.md shows {line!r}, which the main job no longer prints"
        position = found + 1


def test_main_job_page_states_the_defaults_and_the_gathering():
    demo = next(a for a in build_parser()._actions if getattr(a, "choices", None) and "demo" in a.choices).choices["demo"]
    defaults = {a.dest: a.default for a in demo._actions}
    page = (ROOT / "docs" / "main-job.md").read_text()
    stated = dict(re.findall(r"`--(seeds|epochs|kd_epochs) ([^`]+)`", page))
    assert stated == {"seeds": " ".join(map(str, defaults["seeds"])), "epochs": f"{defaults['epochs']:g}",
                      "kd_epochs": f"{defaults['kd_epochs']:g}"}
    from hf_moekd.studies.ones import OneSArguments

    assert f"by `{OneSArguments().gatherings[0]}`" in page and len(documented_output()) == 11
    with pytest.raises(AssertionError, match="no longer prints"):  # the matcher catches a changed label
        assert_prints_what_the_docs_show("\n".join(documented_output()).replace("svd + KD", "average + KD"))
    assert_prints_what_the_docs_show("\n".join(documented_output()))


def test_cli_help_and_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0 and "demo" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        build_parser().parse_args(["nope"])


def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_one():
    lines = (ROOT / "README.md").read_text().splitlines()
    block = lines[lines.index("```bash") + 1:lines.index("```")]  # the first code block, at the top
    assert lines.index("```bash") < 5
    assert [c.split("#")[0].strip() for c in block] == ["python3 dev.py main", "python3 dev.py test"]
    assert "python3 dev.py test" in (ROOT / ".ci" / "run").read_text()
