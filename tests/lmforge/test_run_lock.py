"""One live process per run directory (lmforge.run_lock): a second one is refused in one line naming
the holder, and a SIGKILLed holder leaves no stale lock. Real processes throughout."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge import run_lock
from lmforge.errors import LmforgeError
from pretrain import checkpoint
from tests.lmforge.test_ownership import assert_refused, lmforge, train_args
from tests.pretrain.test_reliability_bad_inputs import snapshot
from tests.pretrain.training_runs import REPO, run_env, start_training, wait_for_checkpoint

HOLD = "import sys, time; from lmforge import run_lock; run_lock.acquire(sys.argv[1]); print('held', flush=True); time.sleep(600)"


def hold_in_another_process(run_dir: Path) -> subprocess.Popen:
    """A real process that takes the lock and sleeps; returns once it holds it."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=REPO, env=run_env(), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_process_is_refused_naming_the_holder(tmp_path):
    holder = hold_in_another_process(tmp_path)
    try:
        with pytest.raises(LmforgeError) as refused:
            run_lock.acquire(tmp_path)
        assert f"run.dir = {tmp_path}: in use by another lmforge process (pid {holder.pid} on {socket.gethostname()}, started 20" \
            in str(refused.value)
        record = json.loads((tmp_path / ".lock").read_text())
        assert record["pid"] == holder.pid and record["host"] == socket.gethostname()
    finally:
        holder.kill()
        holder.wait()


def test_sigkill_of_the_holder_leaves_no_stale_lock(tmp_path):
    holder = hold_in_another_process(tmp_path)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert (tmp_path / ".lock").is_file()  # the file stays; the kernel released the lock
    run_lock.acquire(tmp_path)
    try:
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    finally:
        run_lock.release(tmp_path)


def test_the_same_process_may_lock_again_and_release_lets_another_in(tmp_path):
    run_lock.acquire(tmp_path)
    run_lock.acquire(tmp_path)  # prepare() runs twice when MPI tells the world size late
    other = subprocess.run([sys.executable, "-c", HOLD.replace("time.sleep(600)", "pass"), str(tmp_path)], cwd=REPO,
                           env=run_env(), capture_output=True, text=True)
    assert other.returncode != 0 and f"pid {os.getpid()}" in other.stderr
    run_lock.release(tmp_path)
    again = subprocess.run([sys.executable, "-c", HOLD.replace("time.sleep(600)", "pass"), str(tmp_path)], cwd=REPO,
                           env=run_env(), capture_output=True, text=True)
    assert again.returncode == 0 and again.stdout.strip() == "held", again.stderr


def test_acquire_on_main_refuses_on_every_rank_together(tmp_path):
    holder = hold_in_another_process(tmp_path)
    try:
        shared = []
        with pytest.raises(LmforgeError, match="in use by another lmforge process"):
            run_lock.acquire_on_main(tmp_path, True, lambda value: shared.append(value) or value)
        assert shared and "in use" in shared[0]
        with pytest.raises(LmforgeError, match="in use by"):  # a rank other than 0 gets rank 0's verdict
            run_lock.acquire_on_main(tmp_path, False, lambda value: shared[0])
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_two_train_processes_on_one_run_dir_one_is_refused_and_a_killed_run_resumes(finished_tiny_run, tmp_path):
    ws = tmp_path / "ws"
    shutil.copytree(finished_tiny_run, ws)
    run = ws / "run2"
    # 400 steps of at least 0.5 s: still running when the second command (seconds of imports) is refused
    first = start_training(run, ws / "shards", extra_env={"LMFORGE_FAULT_STEP_DELAY": "0.5"},
                           **{"train.max_steps": 400, "train.save_interval": 2})
    try:
        wait_for_checkpoint(run, "step_00000002", first)
        metrics_before = (run / "metrics.jsonl").read_bytes()
        second = lmforge(*train_args(ws, run, "train.max_steps=400"))
        error = assert_refused(second, f"run.dir = {run}: in use by another lmforge process (pid {first.pid} on")
        assert "wait for it to finish" in error
        assert (run / "metrics.jsonl").read_bytes().startswith(metrics_before)  # the second wrote nothing
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
    # the SIGKILLed run left its lock file but no lock: the rerun takes it and resumes
    assert json.loads((run / ".lock").read_text())["pid"] == first.pid
    saved = checkpoint.step_of_tag(checkpoint.latest_tag(run))
    resumed = lmforge(*train_args(ws, run, f"train.max_steps={saved + 2}", "run.log_interval=1"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {saved}" in resumed.stdout and f"done at step {saved + 2}" in resumed.stdout


@pytest.mark.slow
def test_a_second_sft_on_a_locked_run_dir_is_refused_and_changes_nothing(finished_tiny_run, tmp_path):
    ws = tmp_path / "ws"
    shutil.copytree(finished_tiny_run, ws)
    sft = ws / "sft"
    sft.mkdir()
    holder = hold_in_another_process(sft)
    try:
        (ws / "sft.jsonl").write_text('{"prompt": "a", "response": "b"}\n' * 8)
        before = snapshot(ws)
        result = lmforge("sft", "--set", f"init.from_run={ws / 'run'}", "--set", f"data.train={ws / 'sft.jsonl'}",
                         "--set", f"run.dir={sft}", "--set", "train.max_steps=1", "--set", "train.warmup_steps=1",
                         "--set", "run.progress_bar=false",
                         "--set", "run.tensorboard=false")
        assert_refused(result, f"in use by another lmforge process (pid {holder.pid}")
        after = snapshot(ws)
        assert {k: v for k, v in after.items() if not k.startswith("sft/.lmforge-owner")} == before
    finally:
        holder.kill()
        holder.wait()
