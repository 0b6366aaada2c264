"""Build shim: ships the top-level `model_cards/` templates inside the package, as `hf_moekd/model_cards/`, and the
`hf-moekd` launcher module `hf_moekd_cli.py`.

Everything else (metadata, dependencies, package data) is in pyproject.toml; pyproject's `packages.find` cannot map a
folder from outside `hf_moekd/` into it, `package_dir` here does.
"""
from setuptools import find_namespace_packages, setup

setup(
    packages=[*find_namespace_packages(include=["hf_moekd*"]), "hf_moekd.model_cards"],
    package_dir={"hf_moekd.model_cards": "model_cards"},
    py_modules=["hf_moekd_cli"],  # the `hf-moekd` launcher
)
