"""The `lmforge` command (lmforge/cli.py): a line within a moment of starting a verb that loads torch and DeepSpeed."""
from __future__ import annotations

import subprocess
import sys

import pytest

from lmforge.launcher_env import RANK_VARIABLES
from tests.pretrain.training_runs import REPO, run_env


def lmforge(*args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {key: value for key, value in run_env().items() if key not in RANK_VARIABLES} | env
    return subprocess.run([sys.executable, "-m", "lmforge.cli", *args], cwd=REPO, env=environ, capture_output=True,
                          text=True, timeout=300)


def test_the_cli_imports_no_torch_so_its_first_line_comes_before_torch_loads():
    probe = subprocess.run([sys.executable, "-c", "import sys, lmforge.cli; print(sorted(m for m in ('torch', 'deepspeed', "
                            "'numpy') if m in sys.modules))"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0 and probe.stdout.strip() == "[]", probe.stdout + probe.stderr


@pytest.mark.parametrize("rank, said", [(None, True), ("1", False)])
def test_train_says_what_it_loads_first_on_rank_zero_only(rank, said):
    result = lmforge("train", "--config", "no-such-preset", **({"RANK": rank} if rank else {}))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert (lines[:1] == ["lmforge train: loading torch and DeepSpeed"]) is said, lines
    assert [line for line in result.stderr.splitlines() if line.startswith("error: ")], result.stderr


def test_help_and_light_verbs_print_no_loading_line():
    assert "loading" not in lmforge("train", "--help").stdout.splitlines()[0]
    prep = lmforge("prep", "--help")
    assert prep.returncode == 0 and not any("loading" in line for line in prep.stdout.splitlines())
