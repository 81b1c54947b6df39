"""The sbatch scripts of launch/slurm/, submitted unchanged to a real SLURM cluster on this machine.

The cluster (tests/launch/slurm_cluster.py) has two nodes of 2 CPUs and 2 fake GPUs each; the
scripts' GPU-sized defaults are overridden on the sbatch command line, as a user would.
"""
from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.launch.launch_runs import REPO, TWO_RANK_SHARDS, launch_env, logged_steps, optimizer_shards, tiny_train_args

pytestmark = pytest.mark.slow

SLURM = REPO / "launch" / "slurm"
TWO_TASKS_ONE_NODE = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=2", "--cpus-per-task=1"]
ONE_TASK_TWO_NODES = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=1", "--cpus-per-task=1"]


def submit_and_wait(cluster, script: str, train_args: list[str], options: list[str], log: Path, **env):
    job_id = cluster.submit(SLURM / script, train_args, [*options, f"--output={log}"], REPO, launch_env(**env))
    job = cluster.wait(job_id)
    return job, log.read_text() if log.exists() else ""


@pytest.fixture(scope="module")
def single_node_run(slurm_cluster, tiny_corpus_shards, tmp_path_factory):
    """single_node.sbatch, 2 tasks, 6 steps: the job, its log and run dir."""
    root = tmp_path_factory.mktemp("slurm_single")
    run_dir = root / "run"
    job, log = submit_and_wait(slurm_cluster, "single_node.sbatch", tiny_train_args(run_dir, tiny_corpus_shards.shard_dir, 6),
                               TWO_TASKS_ONE_NODE, root / "job1.out")
    return job, log, run_dir


def test_single_node_sbatch_trains_one_rank_per_task(single_node_run):
    job, log, run_dir = single_node_run
    assert (job.state, job.exit_code) == ("COMPLETED", "0:0"), log
    assert re.search(r"master \S+:\d+", log) and "ok: tiny" in log  # master from scontrol, then preflight
    assert "on 2 rank(s)" in log
    assert logged_steps(run_dir) == [1, 2, 3, 4, 5, 6]
    assert optimizer_shards(run_dir, 6) == TWO_RANK_SHARDS


def test_resubmitting_with_the_same_run_dir_resumes(slurm_cluster, single_node_run, tiny_corpus_shards, tmp_path):
    _, _, run_dir = single_node_run
    job, log = submit_and_wait(slurm_cluster, "single_node.sbatch", tiny_train_args(run_dir, tiny_corpus_shards.shard_dir, 9),
                               TWO_TASKS_ONE_NODE, tmp_path / "job2.out")
    assert (job.state, job.exit_code) == ("COMPLETED", "0:0"), log
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000006'} at step 6" in log
    assert logged_steps(run_dir) == list(range(1, 10))
    assert optimizer_shards(run_dir, 9) == TWO_RANK_SHARDS


def test_sbatch_stops_before_srun_when_preflight_fails(slurm_cluster, shards, tmp_path):
    args = tiny_train_args(tmp_path / "run", shards, **{"model.vocab_size": 1000})
    log = tmp_path / "job.out"
    job_id, returncode = slurm_cluster.submit_and_wait(SLURM / "single_node.sbatch", args,
                                                       [*TWO_TASKS_ONE_NODE, f"--output={log}"], REPO, launch_env())
    assert returncode == 2  # sbatch --wait exits with the job's status: preflight's
    job = slurm_cluster.job(job_id)
    assert (job.state, job.exit_code) == ("FAILED", "2:0")
    text = log.read_text()
    assert "error: model.vocab_size = 1000 but the tokenizer of data.path has 512 tokens" in text
    assert "training llama" not in text and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_multi_node_sbatch_runs_ranks_on_both_nodes(slurm_cluster, shards, tmp_path):
    slurm_cluster.require_nodes(2)
    run_dir = tmp_path / "run"
    job, log = submit_and_wait(slurm_cluster, "multi_node.sbatch", tiny_train_args(run_dir, shards, 5),
                               ONE_TASK_TWO_NODES, tmp_path / "job.out")
    assert (job.state, job.exit_code) == ("COMPLETED", "0:0"), log
    assert job.fields["NumNodes"] == "2" and job.fields["NumTasks"] == "2"
    first_node = subprocess.run(["scontrol", "show", "hostnames", job.fields["NodeList"]], capture_output=True,
                                text=True, env=slurm_cluster.env()).stdout.split()[0]
    assert f"master {first_node}:" in log
    assert "on 2 rank(s)" in log
    assert optimizer_shards(run_dir, 5) == TWO_RANK_SHARDS


def test_multi_node_deepspeed_sbatch_starts_the_launcher_once_per_node(slurm_cluster, shards, tmp_path):
    slurm_cluster.require_nodes(2)
    run_dir = tmp_path / "run"
    job, log = submit_and_wait(slurm_cluster, "multi_node_deepspeed.sbatch", tiny_train_args(run_dir, shards, 5),
                               ONE_TASK_TWO_NODES, tmp_path / "job.out")
    assert (job.state, job.exit_code) == ("COMPLETED", "0:0"), log
    for node_rank in (0, 1):  # DeepSpeed's launch.py on each node, one rank each
        assert f"nnodes=2, num_local_procs=1, node_rank={node_rank}" in log
    assert "on 2 rank(s)" in log
    assert optimizer_shards(run_dir, 5) == TWO_RANK_SHARDS


USR1_TASK = """
import os, signal, sys, time
out, rank = sys.argv[1], os.environ["SLURM_PROCID"]
if int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0:
    print(f"rank {rank} resumed", flush=True)
    sys.exit(0)
def stop(signum, frame):
    open(f"{out}/usr1_rank{rank}", "w").write("checkpointed")
    sys.exit(0)
signal.signal(signal.SIGUSR1, stop)
open(f"{out}/started_rank{rank}", "w").close()
time.sleep(300)
sys.exit(3)
"""


def _release_requeued(cluster, job_id: str, timeout: float = 60) -> None:
    """A requeued job waits ~2 min (its BeginTime); start it now.

    Not in the same second as the kill, though: slurmd revokes the job's credential at the kill
    and refuses a launch of that job id within the same second ("Job credential revoked"), which
    fails the job. Slurm's own requeue delay exists for this; two seconds are enough here.
    """
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = cluster.job(job_id)
        if job.fields.get("Restarts") == "1" and job.state == "PENDING":
            time.sleep(2)
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=cluster.env(), check=True)
            return
        if job.fields.get("Restarts") == "1" and job.state not in ("COMPLETING", "REQUEUED"):
            return
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} was not requeued: {cluster.job(job_id)}")


def _wait_for_files(paths: list[Path], timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not all(p.exists() for p in paths):
        assert time.time() < deadline, f"not all of {paths} appeared"
        time.sleep(0.2)


def test_usr1_to_the_batch_shell_reaches_every_task_then_requeues(slurm_cluster, tmp_path):
    """common.sh's signal path with a stand-in step: what `--signal=B:USR1@120` does before the time limit."""
    task = tmp_path / "task.py"
    task.write_text(USR1_TASK)
    script = tmp_path / "usr1.sbatch"
    script.write_text(
        "#!/bin/bash\n#SBATCH --requeue\n#SBATCH --open-mode=append\nset -euo pipefail\n"
        f"source {SLURM / 'common.sh'}\nlmforge_enter_checkout\nlmforge_master_address\n"
        f"lmforge_run_step srun {sys.executable} {task} {tmp_path}\n"
    )
    log = tmp_path / "job.out"
    job_id = slurm_cluster.submit(script, [], [*TWO_TASKS_ONE_NODE, f"--output={log}"], REPO, launch_env())
    _wait_for_files([tmp_path / "started_rank0", tmp_path / "started_rank1"])
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=slurm_cluster.env(), check=True)
    _release_requeued(slurm_cluster, job_id)
    job = slurm_cluster.wait(job_id)
    text = log.read_text()
    assert (job.state, job.exit_code, job.fields["Restarts"]) == ("COMPLETED", "0:0", "1"), text
    assert [(tmp_path / f"usr1_rank{r}").read_text() for r in (0, 1)] == ["checkpointed", "checkpointed"]
    assert "SIGUSR1: time limit near" in text and f"requeueing job {job_id}" in text
    assert "(restart 1)" in text and "rank 0 resumed" in text and "rank 1 resumed" in text


def test_usr1_before_the_time_limit_checkpoints_training_and_resumes(slurm_cluster, shards, tmp_path):
    """single_node.sbatch end to end: the ranks save at the next step, the job requeues and finishes."""
    run_dir = tmp_path / "run"
    log = tmp_path / "job.out"
    args = tiny_train_args(run_dir, shards, 30)
    job_id = slurm_cluster.submit(SLURM / "single_node.sbatch", args, [*TWO_TASKS_ONE_NODE, f"--output={log}"], REPO,
                                  launch_env(LMFORGE_FAULT_STEP_DELAY="0.3"))
    deadline = time.time() + 120
    while not ((run_dir / "metrics.jsonl").exists() and logged_steps(run_dir)):
        assert time.time() < deadline and slurm_cluster.job(job_id).state in ("PENDING", "RUNNING"), log.read_text()
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=slurm_cluster.env(), check=True)
    deadline = time.time() + 60
    while slurm_cluster.job(job_id).fields.get("Restarts") != "1" and slurm_cluster.job(job_id).state == "RUNNING":
        assert time.time() < deadline
        time.sleep(0.3)
    assert slurm_cluster.job(job_id).fields.get("Restarts") == "1", log.read_text()
    _release_requeued(slurm_cluster, job_id)
    job = slurm_cluster.wait(job_id)
    text = log.read_text()
    assert (job.state, job.exit_code) == ("COMPLETED", "0:0"), text
    assert "preempted by SIGUSR1: saved" in text and "checkpoint saved before the time limit" in text, text
    saved = int(re.search(r"resumed from \S+step_(\d+) at step", text).group(1))
    assert 1 <= saved < 30
    assert logged_steps(run_dir) == list(range(1, 31))
