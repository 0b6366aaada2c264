"""Help that matches the code (issue 31.6): `hf-moekd [COMMAND] --help` answers from texts rendered from the argument
parsers (the one source; docs/cli.md is rendered from the same), without importing hf_moekd; distill lists our flags
first and the TrainingArguments ones on demand."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "utils"))
import cli_reference  # noqa: E402

from hf_moekd.recipes.arguments import TASK_NAMES  # noqa: E402


def test_saved_help_and_docs_match_the_parsers():
    assert cli_reference.main(["--check"]) == 0, "run python utils/cli_reference.py"


def test_help_answers_without_importing_the_package():
    code = ("import sys, hf_moekd_cli; hf_moekd_cli.main(['distill', '--help']); hf_moekd_cli.main(['--help']); "
            "assert not {'torch', 'transformers', 'hf_moekd'} & set(sys.modules), sorted(sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    saved = json.loads((ROOT / "hf_moekd" / "cli_help.json").read_text())
    assert result.stdout == saved["distill"] + saved["hf-moekd"]


def test_help_texts_name_every_task_and_group_our_flags_first():
    texts = cli_reference.render()
    for command in ("distill", "evaluate"):
        assert all(name in " ".join(texts[command].split()) for name in TASK_NAMES), command
    distill = texts["distill"]
    headings = [line[:-1] for line in distill.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    assert headings[-6:] == ["task", "student model", "data", "logs and plots", "distillation",
                             "training (transformers.TrainingArguments)"]
    assert "--output_dir" in distill and "--lr_scheduler_type" not in distill and "--help_all" in distill
    assert "clm / seq2seq: held-out texts" not in texts["evaluate"]  # the old hand-written flag list


def test_help_all_lists_every_training_flag(capsys):
    from hf_moekd.cli import main

    try:
        main(["distill", "--help_all"])
    except SystemExit as exit_:
        assert exit_.code in (0, None)
    out = capsys.readouterr().out
    body = out[out.index("\noptions:"):]  # past the usage line
    assert body.index("\n  --alpha") < body.index("\n  --lr_scheduler_type")
