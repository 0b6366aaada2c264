"""The package's architecture: imports only go downward (import-linter contracts in pyproject.toml, function-level
imports included), no cycle between top-level units, model copies identical to their sources, and every method
registered by one entry-point line."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "utils"))
from check_copies import drifted_copies  # noqa: E402

LINT = [str(Path(sys.executable).parent / "lint-imports"), "--no-cache", "--no-logo"]


def lint(package_parent: Path) -> subprocess.CompletedProcess:
    """lint-imports with the project's contracts on the `hf_moekd` found in `package_parent`."""
    env = {"PYTHONPATH": str(package_parent), "PATH": "/usr/bin:/bin"}
    return subprocess.run([*LINT, str(ROOT / "pyproject.toml")], cwd=package_parent, env=env, capture_output=True,
                          text=True)


def test_layers_hold():
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize("module,upward", [
    ("cards/facts.py", "    from ..distillation import DistillationTrainer\n"),  # a function-level import
    ("distillation/losses.py", "from ..opdf import MPOLinear\n"),
    ("ones/gather.py", "from ..mode import MoDELoss\n"),  # between two method packages
    ("recipes/text.py", "from ..studies import demo\n"),  # a recipe importing a study pipeline
    ("models/dense_vit/modeling_dense_vit.py", "from ...utils import markdown_table\n"),
    ("models/vmoe/modeling_vmoe.py", "from ..dense_vit.modeling_dense_vit import DenseViTMLP\n"),  # across models
])
def test_an_upward_import_breaks_the_contracts(tmp_path, module, upward):
    shutil.copytree(ROOT / "hf_moekd", tmp_path / "hf_moekd", ignore=shutil.ignore_patterns("__pycache__"))
    path = tmp_path / "hf_moekd" / module
    text = path.read_text()
    if upward.startswith("    "):
        path.write_text(text + "\n\ndef _late():\n" + upward + "    return DistillationTrainer\n")
    else:
        head, sep, rest = text.partition("from __future__ import annotations\n")
        path.write_text(head + sep + upward + rest)
    result = lint(tmp_path)
    assert result.returncode != 0 and "BROKEN" in result.stdout, result.stdout + result.stderr


def test_no_import_cycle_between_top_level_units():
    tool = ROOT.parent / "shared" / "tools" / "unit_cycles.py"
    if not tool.is_file():
        pytest.skip("the workplace's unit_cycles tool is not beside the checkout")
    result = subprocess.run([sys.executable, str(tool), "hf_moekd"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_model_copies_are_identical():
    problems = [p for f in sorted((ROOT / "hf_moekd" / "models").rglob("*.py"))
                for p in drifted_copies(f.read_text(), str(f))]
    assert not problems, problems


def test_a_drifted_copy_is_reported():
    source = (ROOT / "hf_moekd" / "models" / "dense_vit" / "modeling_dense_vit.py").read_text()
    assert "# Copied from hf_moekd.models.minimoe" in source
    drifted = source.replace("weights = scores.softmax(-1)", "weights = scores.softmax(-1) * 1.0", 1)
    assert len(drifted_copies(drifted)) == 1


@pytest.mark.parametrize("model,edit", [
    ("vmoe/modeling_vmoe.py", ("self.dropout(self.fc2(self.act(", "self.dropout(self.fc2(0.5 * self.act(")),  # a class
    ("vmoe/modeling_vmoe.py", ("self.embeddings = VMoEEmbeddings", "self.embeddings: nn.Module = VMoEEmbeddings")),
    ("vmoe/configuration_vmoe.py", ("    qkv_bias: bool = True", "    qkv_bias: bool = False")),  # decorated class
    ("vmoe/__init__.py", ("    VMoEConfig.register_for_auto_class()\n", "")),  # a function copied with a replacement
])
def test_a_drifted_copy_in_vmoe_is_reported(model, edit):
    """V-MoE keeps copies of DenseViT's and MiniMoE's code (it imports neither): editing a copy is caught."""
    source = (ROOT / "hf_moekd" / "models" / model).read_text()
    assert source.count(edit[0]) == 1
    assert drifted_copies(source) == []
    assert len(drifted_copies(source.replace(*edit))) == 1


def test_copied_from_marks_take_several_replacements():
    source = ("# Copied from hf_moekd.models.dense_vit.modeling_dense_vit.DenseViTForImageClassification.__init__ with "
              "DenseViT->Tiny,dense_vit->tiny\n"
              "def __init__(self, config: TinyConfig):\n"
              "    super().__init__(config)\n"
              "    self.num_labels = config.num_labels\n"
              "    self.tiny = TinyModel(config)\n"
              "    self.classifier = nn.Linear(config.hidden_size, config.num_labels)\n"
              "    self.post_init()\n")
    assert drifted_copies(source) == []
    assert len(drifted_copies(source.replace("self.tiny =", "self.dense_vit ="))) == 1


def test_every_method_registers_through_its_entry_point():
    from importlib.metadata import entry_points

    from hf_moekd.cards import card_methods
    from hf_moekd.distillation import get_loss_class

    packages = {p.name: p.value for p in entry_points(group="hf_moekd.methods")}
    assert set(packages) == {"distillation", "ones", "minimoe", "opdf", "mode", "m2mkd"}
    assert {"kd", "fine-tune", "task-agnostic", "gathering", "ones", "minimoe", "opdf", "mode", "m2mkd"} <= set(card_methods())
    for term in ("mpo_constraint", "mode", "mode_all"):  # found without importing their packages first
        assert get_loss_class(term).name == term

