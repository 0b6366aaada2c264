"""The top-level API (lazy names that type checkers see too) and the packaging metadata."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INIT = ROOT / "hf_moekd" / "__init__.py"


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib", reason="Python 3.10 has no tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def lazy_and_type_checking_names(source: str) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """`_import_structure` and the `if TYPE_CHECKING:` imports of an `hf_moekd/__init__.py`, as module -> names."""
    tree = ast.parse(source)
    lazy = next(ast.literal_eval(node.value) for node in tree.body
                if isinstance(node, ast.AnnAssign) and ast.unparse(node.target) == "_import_structure")
    block = next(node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING")
    typed: dict[str, set[str]] = {}
    for node in block.body:
        assert isinstance(node, ast.ImportFrom) and node.level == 1, ast.unparse(node)
        assert all(alias.asname is None for alias in node.names), f"no renaming on the way up: {ast.unparse(node)}"
        typed.setdefault(node.module, set()).update(alias.name for alias in node.names)
    return {module: set(names) for module, names in lazy.items()}, typed


def test_lazy_names_and_the_type_checking_block_agree():
    lazy, typed = lazy_and_type_checking_names(INIT.read_text())
    assert lazy == typed
    names = [name for names in lazy.values() for name in names]
    assert len(names) == len(set(names)), "a name given by two modules"


def test_a_name_missing_from_the_type_checking_block_is_caught():
    source = INIT.read_text().replace('"probe_experts", "routing_counts"', '"probe_experts", "routing_counts", "ProbeResult"')
    lazy, typed = lazy_and_type_checking_names(source)
    assert lazy != typed and lazy["analysis"] - typed["analysis"] == {"ProbeResult"}


def test_public_api_loads_lazily():
    code = ("import sys, hf_moekd; assert 'hf_moekd.distillation' not in sys.modules; "
            "from hf_moekd import (MiniMoEConfig, MiniMoEForSequenceClassification, MiniMoEForTokenClassification, "
            "VMoEConfig, VMoEForImageClassification, DenseViTConfig, DenseViTForImageClassification, gather_experts, "
            "DistillationTrainer, DistillationArguments, DistillationBatch, LossTerm, MoDETrainer, overparameterize, "
            "contract_overparameterized, probe_experts, write_model_card); import hf_moekd as h; "
            "[getattr(h, n) for n in h.__all__]; "
            "import hf_moekd.distillation as d; assert h.DistillationBatch is d.DistillationBatch")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_recipes_and_internals_stay_below_the_top_level():
    import hf_moekd

    for name in ("run_ones", "run_m2mkd", "OneSArguments", "M2MArguments", "ModelArguments", "training_facts",
                 "contract"):
        assert name not in hf_moekd.__all__ and not hasattr(hf_moekd, name), name


def test_packaging_metadata_is_stated_once_and_as_ranges():
    project = pyproject()
    assert "version" not in project["project"] and project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "hf_moekd.__version__"}
    assert re.search(r'^__version__ = "\d+\.\d+\.\d+"', INIT.read_text(), re.M)
    pinned = [dep for dep in project["project"]["dependencies"] if "==" in dep]
    assert not pinned, f"exact pins belong in constraints.txt: {pinned}"


def test_every_runtime_dependency_is_imported():
    project = pyproject()
    declared = {re.split(r"[<>=!~;\[ ]", dep)[0] for dep in project["project"]["dependencies"]}
    import_name = {"scikit-learn": "sklearn"}
    source = "\n".join(p.read_text() for p in (ROOT / "hf_moekd").rglob("*.py"))
    unused = {dep for dep in declared - {"accelerate"}  # transformers' Trainer needs accelerate; not imported here
              if not re.search(rf"^\s*(import|from) {import_name.get(dep, dep)}\b", source, re.M)}
    assert not unused, f"declared but never imported: {unused}"
