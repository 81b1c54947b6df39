"""The import order of README.md's layout table, enforced by import-linter (contracts in .importlinter):
lmforge <- data_prep <- pretrain <- posttrain <- run_tools <- launch | bench, and no cycles inside a
folder. The second and third tests show the contracts catch a back-import and a cycle, on a copy of
the tree (the real tree is never edited)."""
from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / ".importlinter"


def root_packages() -> list[str]:
    parser = configparser.ConfigParser()
    parser.read(CONFIG)
    return parser["importlinter"]["root_packages"].split()


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` run in `root`, with only `root`'s packages importable."""
    script = Path(sys.executable).with_name("lint-imports")
    if not script.exists():
        pytest.fail("lint-imports not installed: pip install -e '.[test]' (import-linter)")
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(script), "--config", str(root / ".importlinter"), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)


def tree_copy(tmp_path: Path) -> Path:
    """The packages' .py files and the contracts, copied under tmp_path."""
    root = tmp_path / "tree"
    for package in root_packages():
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(CONFIG, root / ".importlinter")
    return root


def test_every_package_is_in_the_contract():
    packages = {p.parent.name for p in REPO.glob("*/__init__.py")} - {"tests"}
    assert packages == set(root_packages())


def test_imports_go_only_downward_and_have_no_cycles():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 2 kept, 0 broken." in result.stdout


def test_a_back_import_breaks_the_layers_contract(tmp_path):
    root = tree_copy(tmp_path)
    assert lint_imports(root).returncode == 0
    model = root / "pretrain" / "model.py"
    model.write_text(model.read_text() + "\nfrom posttrain.config import PosttrainConfig  # a back-import\n")
    result = lint_imports(root)
    assert result.returncode == 1
    assert "Stages import only downward" in result.stdout and "BROKEN" in result.stdout
    assert "pretrain.model -> posttrain.config" in result.stdout
    assert "Contracts: 1 kept, 1 broken." in result.stdout


def test_a_cycle_inside_a_folder_breaks_the_acyclic_contract(tmp_path):
    root = tree_copy(tmp_path)
    config = root / "pretrain" / "config.py"  # pretrain.metrics does not import pretrain.config: this closes a cycle
    config.write_text(config.read_text() + "\nimport pretrain.metrics  # noqa: E402\n")
    metrics = root / "pretrain" / "metrics.py"
    metrics.write_text(metrics.read_text() + "\nimport pretrain.config  # noqa: E402\n")
    result = lint_imports(root)
    assert result.returncode == 1
    assert "No import cycles between the modules of a folder BROKEN" in result.stdout
    assert "Contracts: 1 kept, 1 broken." in result.stdout
