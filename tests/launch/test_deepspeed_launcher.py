"""launch/deepspeed.sh drives DeepSpeed's own runner: one machine, two 'nodes' of localhost, and the OpenMPI backend."""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.launch.launch_runs import (REPO, TWO_RANK_SHARDS, free_port, launch_env, logged_steps, optimizer_shards,
                                      tiny_train_args)

pytestmark = pytest.mark.slow
SCRIPT = str(REPO / "launch" / "deepspeed.sh")


def run_script(args, timeout=600, **env) -> str:
    result = subprocess.run([SCRIPT, *args], cwd=REPO, env=launch_env(**env), capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    return output


def test_deepspeed_sh_starts_two_cpu_ranks_on_this_machine(shards, tmp_path):
    run_dir = tmp_path / "run"
    output = run_script(tiny_train_args(run_dir, shards, 5), NUM_GPUS="2", MASTER_PORT=str(free_port()))
    assert "ok: tiny" in output and re.search(r"world size +2 rank\(s\)", output)  # preflight ran first
    assert "dist_world_size=2" in output and "on 2 rank(s)" in output
    assert logged_steps(run_dir) == [1, 2, 3, 4, 5]
    assert optimizer_shards(run_dir, 5) == TWO_RANK_SHARDS


def test_two_node_ranks_on_localhost_rendezvous_without_ssh(shards, tmp_path):
    """Two `deepspeed --no_ssh --node_rank R` launches, as on two nodes, meet at MASTER_ADDR:MASTER_PORT."""
    run_dir = tmp_path / "run"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two 'nodes' of this machine\nnode-a slots=1\nnode-b slots=1\n")
    env = launch_env(HOSTFILE=str(hostfile), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    nodes = [subprocess.Popen([SCRIPT, *tiny_train_args(run_dir, shards, 5)], cwd=REPO, env={**env, "NODE_RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    for rank, (node, output) in enumerate(zip(nodes, outputs)):
        assert node.returncode == 0, output[-6000:]
        assert f"nnodes=2, num_local_procs=1, node_rank={rank}" in output
    assert "on 2 rank(s)" in outputs[0]
    assert optimizer_shards(run_dir, 5) == TWO_RANK_SHARDS


@pytest.mark.skipif(shutil.which("ompi_info") is None, reason="OpenMPI is not installed (apt: openmpi-bin)")
def test_openmpi_backend_forwards_the_deepspeed_env_file(shards, tmp_path):
    """The multi-node path of DeepSpeed's runner: RUN_DIR/.deepspeed_env reaches mpirun as -x exports."""
    run_dir = tmp_path / "run"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    output = run_script(
        tiny_train_args(run_dir, shards, 4),
        HOSTFILE=str(hostfile), LAUNCHER="openmpi", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
        LAUNCHER_ARGS="--allow-run-as-root --oversubscribe --mca btl_tcp_if_include lo",
        DEEPSPEED_ARGS="--force_multi --no_ssh_check", EXPORT_ENV="LMFORGE_PROBE", LMFORGE_PROBE="from-the-launch-node",
        TORCH_CUDA_ARCH_LIST="9.0a",
    )
    env_file = (run_dir / ".deepspeed_env").read_text().splitlines()
    assert "TORCH_CUDA_ARCH_LIST=9.0" in env_file and "LMFORGE_PROBE=from-the-launch-node" in env_file
    mpirun_line = next(line for line in output.splitlines() if "cmd = mpirun" in line)
    assert "-x TORCH_CUDA_ARCH_LIST=9.0 " in mpirun_line and "-x LMFORGE_PROBE=from-the-launch-node" in mpirun_line
    assert "on 2 rank(s)" in output
    assert optimizer_shards(run_dir, 4) == TWO_RANK_SHARDS
