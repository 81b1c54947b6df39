"""`mpirun -np 2 python -m pretrain.train`: OpenMPI starts the ranks, DeepSpeed's MPI discovery (mpi4py) wires them."""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys

import pytest

from tests.launch.launch_runs import REPO, TWO_RANK_SHARDS, launch_env, logged_steps, optimizer_shards, tiny_train_args

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("mpirun") is None, reason="OpenMPI's mpirun is not installed (apt: openmpi-bin)"),
    pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None, reason="mpi4py is not installed (pip install mpi4py)"),
]


def test_mpirun_trains_two_ranks_through_deepspeed_mpi_discovery(shards, tmp_path):
    run_dir = tmp_path / "run"
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", "--mca", "btl_tcp_if_include", "lo",
           sys.executable, "-m", "pretrain.train", *tiny_train_args(run_dir, shards, 5)]
    result = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    assert "on 2 rank(s)" in output
    assert logged_steps(run_dir) == [1, 2, 3, 4, 5]
    assert optimizer_shards(run_dir, 5) == TWO_RANK_SHARDS  # ZeRO-1: each rank saved its optimizer partition
