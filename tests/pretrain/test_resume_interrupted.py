"""Interrupted runs lose nothing: SIGKILL at seeded random steps and inside a checkpoint write, and
SIGTERM/SIGUSR1 preemption; rerunning the same command reproduces the uninterrupted run's fp32
metrics exactly (ZeRO-0 on 1 rank, ZeRO-3 on 2 ranks with torchrun)."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pretrain import checkpoint
from tests.pretrain.training_runs import REPO, run_env, start_training, tiny_overrides, training_command

pytestmark = pytest.mark.slow

KILL_SEED = 8  # picks the kill steps; change it to explore other interleavings
MAX_STEPS, SAVE_INTERVAL = 10, 3
SETUPS = {"zero0-1rank": (1, "ds_configs/zero0.json"), "zero3-2ranks": (2, "ds_configs/zero3.json")}
DETERMINISTIC_KEYS = ("step", "loss", "lr", "grad_norm", "tokens", "skipped_steps", "val_loss")


def settings(setup: str) -> dict:
    nproc, ds_json = SETUPS[setup]
    return {"deepspeed.config": ds_json, "train.max_steps": MAX_STEPS, "train.save_interval": SAVE_INTERVAL,
            "train.keep_last": 1}


def deterministic_metrics(run_dir: Path) -> list[dict]:
    """Metric lines without the timings."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: line[k] for k in DETERMINISTIC_KEYS if k in line} for line in lines]


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip() and '"loss"' in line]


def run_to_end(run_dir: Path, shards: Path, setup: str) -> str:
    nproc, _ = SETUPS[setup]
    cmd = training_command(nproc) + ["--config", "tiny"] + tiny_overrides(run_dir, shards, **settings(setup))
    result = subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def reference(tiny_corpus_shards, tmp_path_factory):
    """Uninterrupted runs' metrics, per setup (computed on first use)."""
    cache: dict[str, list[dict]] = {}

    def get(setup: str) -> list[dict]:
        if setup not in cache:
            run_dir = tmp_path_factory.mktemp(f"reference-{setup}")
            run_to_end(run_dir, tiny_corpus_shards.shard_dir, setup)
            cache[setup] = deterministic_metrics(run_dir)
            assert [m["step"] for m in cache[setup] if "loss" in m] == list(range(1, MAX_STEPS + 1))
        return cache[setup]

    return get


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"training exited ({proc.returncode}) before {what}:\n{proc.stdout.read()[-4000:]}")
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def assert_latest_is_complete_and_intact(run_dir: Path) -> str | None:
    latest = run_dir / "checkpoints" / "latest"
    if not latest.exists():
        assert checkpoint.complete_tags(run_dir) == []
        return None
    tag = latest.read_text().strip()
    assert (run_dir / "checkpoints" / tag / "COMPLETE").is_file(), f"latest names partial {tag}"
    assert checkpoint.damage(run_dir, tag) == []
    return tag


def worker_pids(launcher_pid: int) -> dict[int, int]:
    """rank -> pid of the training processes under a torchrun launcher."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == launcher_pid:
            ranks = [e.split(b"=", 1)[1] for e in env if e.startswith(b"RANK=")]
            if ranks:
                found[int(ranks[0])] = int(entry.name)
    return found


def crash(proc: subprocess.Popen) -> None:
    """SIGKILL to the launcher and every rank at once, as a node failure. (torchrun starts each worker
    in its own session, so killing the launcher's process group alone would leave them running.)"""
    workers = worker_pids(proc.pid)
    for pid in [proc.pid, *workers.values()]:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)
    for pid in workers.values():
        while Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid):
            time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return (Path(f"/proc/{pid}") / "status").read_text().split("State:", 1)[1].split("\n", 1)[0].lower()
    except (OSError, IndexError):
        return "zombie"


def kill_after_step(run_dir, shards, setup, step) -> None:
    nproc, _ = SETUPS[setup]
    proc = start_training(run_dir, shards, nproc, {"LMFORGE_FAULT_STEP_DELAY": "0.3"}, **settings(setup))
    wait_for(lambda: any(s >= step for s in logged_steps(run_dir)), proc, f"step {step}")
    crash(proc)


def kill_inside_save(run_dir, shards, setup, step) -> None:
    """SIGKILL while the save of `step` sleeps between DeepSpeed's files and COMPLETE, on every rank."""
    nproc, _ = SETUPS[setup]
    folder = run_dir / "checkpoints" / checkpoint.tag_for_step(step)
    proc = start_training(run_dir, shards, nproc, {"LMFORGE_FAULT_SAVE_DELAY": f"120@{step}"}, **settings(setup))
    wait_for(lambda: all((folder / f"rng_rank{r}.pt").exists() for r in range(nproc)), proc, f"the save of step {step}")
    time.sleep(0.3)
    crash(proc)
    assert not (folder / "COMPLETE").exists()


@pytest.mark.parametrize("setup", list(SETUPS))
def test_sigkill_at_random_steps_and_inside_a_save_resumes_to_the_same_losses(setup, reference, shards, tmp_path):
    expected = reference(setup)
    rng = random.Random(KILL_SEED)
    before_save, after_save = rng.randint(1, 5), rng.randint(7, 9)
    run_dir = tmp_path / "run"

    kill_after_step(run_dir, shards, setup, before_save)
    tag = assert_latest_is_complete_and_intact(run_dir)
    assert tag is None or checkpoint.step_of_tag(tag) <= before_save + 1

    kill_inside_save(run_dir, shards, setup, 6)
    assert assert_latest_is_complete_and_intact(run_dir) == "step_00000003"
    assert checkpoint.complete_tags(run_dir) == ["step_00000003"]  # keep_last = 1 kept the only good one

    if setup == "zero0-1rank":  # a third kill, after the interrupted save
        kill_after_step(run_dir, shards, setup, after_save)
        assert checkpoint.step_of_tag(assert_latest_is_complete_and_intact(run_dir)) in (3, 6, 9)

    out = run_to_end(run_dir, shards, setup)
    assert "resumed from" in out
    assert deterministic_metrics(run_dir) == expected  # exact: fp32, same data order, same RNG
    assert checkpoint.complete_tags(run_dir) == [checkpoint.tag_for_step(MAX_STEPS)]


@pytest.mark.parametrize("setup, sig, ranks_signalled", [
    ("zero0-1rank", signal.SIGTERM, (0,)),
    ("zero3-2ranks", signal.SIGUSR1, (1,)),  # one rank gets it: the all-reduce stops both at the same step
])
def test_preemption_signal_saves_at_the_next_step_exits_0_and_the_rerun_resumes(setup, sig, ranks_signalled, reference,
                                                                                  shards, tmp_path):
    expected = reference(setup)
    nproc, _ = SETUPS[setup]
    run_dir = tmp_path / "run"
    proc = start_training(run_dir, shards, nproc, {"LMFORGE_FAULT_STEP_DELAY": "0.3"}, **settings(setup))
    wait_for(lambda: any(s >= 4 for s in logged_steps(run_dir)), proc, "step 4")
    pids = {0: proc.pid} if nproc == 1 else worker_pids(proc.pid)
    assert sorted(pids) == list(range(nproc))
    for rank in ranks_signalled:
        os.kill(pids[rank], sig)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    stopped = [line for line in out.splitlines() if line.startswith("preempted by")]
    assert len(stopped) == 1, out[-4000:]
    step = int(stopped[0].rsplit("at step ", 1)[1].split(";")[0])
    assert 4 <= step < MAX_STEPS
    by = sig.name if 0 in ranks_signalled else "a signal to another rank"
    assert stopped[0].startswith(f"preempted by {by}: saved {run_dir / 'checkpoints' / checkpoint.tag_for_step(step)}")
    assert assert_latest_is_complete_and_intact(run_dir) == checkpoint.tag_for_step(step)
    assert logged_steps(run_dir) == list(range(1, step + 1))

    rerun = run_to_end(run_dir, shards, setup)
    assert f"resumed from {run_dir / 'checkpoints' / checkpoint.tag_for_step(step)} at step {step}" in rerun
    assert deterministic_metrics(run_dir) == expected

