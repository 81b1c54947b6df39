"""Security rules of the whole code base: safe loaders only, no code from config values, shell
scripts that pass shellcheck, and outputs that other users cannot write."""
from __future__ import annotations

import ast
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pretrain.training_runs import run_env, tiny_overrides

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("lmforge", "data_prep", "pretrain", "posttrain", "run_tools", "launch", "bench")
SHELL_SCRIPTS = (".ci/run", "launch/*.sh", "launch/slurm/*.sh", "launch/slurm/*.sbatch", "bench/*.sh")


def project_sources() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (REPO / package).rglob("*.py"))


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def unsafe_calls(source: str) -> list[tuple[int, str]]:
    """(line, reason) for each call the project must never make."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        keywords = {k.arg: k.value for k in node.keywords}
        if name in ("eval", "exec", "compile") and isinstance(node.func, ast.Name):
            found.append((node.lineno, f"{name}() runs code"))
        elif name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all"):
            found.append((node.lineno, f"{name} (use yaml.safe_load)"))
        elif name in ("pickle.load", "pickle.loads", "marshal.load", "marshal.loads"):
            found.append((node.lineno, f"{name} unpickles code"))
        elif name == "torch.load":
            weights_only = keywords.get("weights_only")
            if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                found.append((node.lineno, "torch.load without weights_only=True"))
        elif name.startswith("subprocess.") and "shell" in keywords:
            shell = keywords["shell"]
            if not (isinstance(shell, ast.Constant) and shell.value is False):
                found.append((node.lineno, f"{name}(shell=...) goes through a shell"))
    return found


def test_the_scanner_finds_each_unsafe_call():
    source = "\n".join([
        "import yaml, torch, pickle, subprocess",
        "eval('1')",
        "yaml.load(open('a'))",
        "pickle.loads(b'')",
        "torch.load('x.pt')",
        "torch.load('x.pt', weights_only=False)",
        "subprocess.run('ls', shell=True)",
        "yaml.safe_load(open('a'))",
        "torch.load('x.pt', weights_only=True)",
        "model.eval()",
    ])
    assert [line for line, _ in unsafe_calls(source)] == [2, 3, 4, 5, 6, 7]


def test_project_code_loads_only_with_safe_loaders_and_never_runs_config_values():
    sources = project_sources()
    assert len(sources) > 50  # the scan really covers the packages
    problems = [f"{path.relative_to(REPO)}:{line}: {reason}"
                for path in sources for line, reason in unsafe_calls(path.read_text())]
    assert problems == []


def shell_scripts() -> list[Path]:
    return sorted(p for pattern in SHELL_SCRIPTS for p in REPO.glob(pattern))


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed (apt: shellcheck)")
def test_launch_and_ci_scripts_pass_shellcheck():
    scripts = shell_scripts()
    assert {"launch/deepspeed.sh", "launch/slurm/common.sh", "launch/slurm/single_node.sbatch", ".ci/run"} <= {
        str(p.relative_to(REPO)) for p in scripts}
    result = subprocess.run(["shellcheck", "--external-sources", "--source-path=SCRIPTDIR", *map(str, scripts)],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-6000:]


def test_shellcheck_is_installed_by_ci():
    assert "shellcheck" in (REPO / ".ci" / "run").read_text()


def _world_writable(root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in [root, *root.rglob("*")]
            if not p.is_symlink() and p.lstat().st_mode & stat.S_IWOTH]


def test_outputs_are_not_world_writable_even_under_umask_000(stdlib_subset, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for path in stdlib_subset(6):
        shutil.copy(path, corpus / path.name)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}

    def lmforge(*args: str) -> None:
        result = subprocess.run([sys.executable, "-m", "lmforge.cli", *args], cwd=REPO, env=env, capture_output=True,
                                text=True, timeout=300, preexec_fn=lambda: os.umask(0))
        assert result.returncode == 0, result.stderr[-3000:]

    lmforge("prep", "tokenizer", "--input", str(corpus), "--vocab-size", "512", "--output", str(out / "tokenizer"),
            "--no-progress")
    lmforge("prep", "shards", "--input", str(corpus), "--tokenizer", str(out / "tokenizer" / "tokenizer.model"),
            "--output", str(out / "shards"), "--workers", "1", "--no-progress")
    run_dir = out / "run"
    train = subprocess.run(
        [sys.executable, "-m", "pretrain.train", "--config", "tiny",
         *tiny_overrides(run_dir, out / "shards", **{"train.max_steps": 2, "train.save_interval": 2})],
        cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600, preexec_fn=lambda: os.umask(0))
    assert train.returncode == 0, train.stderr[-3000:]
    written = [p for p in out.rglob("*") if p.is_file()]
    for expected in (".bin", ".idx", ".model", ".pt", ".yaml", ".jsonl"):
        assert any(p.suffix == expected for p in written), expected
    assert _world_writable(out) == []
