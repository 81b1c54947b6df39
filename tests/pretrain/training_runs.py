"""Runs real training jobs (1 rank with python, 2 ranks with torchrun) for the pretrain tests."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def training_command(nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "pretrain.train"]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(_free_port()), "-m", "pretrain.train"]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_overrides(run_dir: Path, shard_dir: Path, **sets) -> list[str]:
    values = {
        "run.dir": str(run_dir),
        "data.path": f"[{shard_dir}]",
        "run.log_interval": 1,
        "run.progress_bar": "false",
        "run.tensorboard": "false",
        "train.max_steps": 8,
        "train.micro_batch_size": 2,
        "train.seq_len": 32,
        "train.warmup_steps": 2,
        "train.eval_interval": 0,
        "train.save_interval": 0,
        "model.n_layers": 2,
        "model.d_model": 32,
        "model.n_heads": 4,
        "model.n_kv_heads": 2,
        **sets,
    }
    args = []
    for key, value in values.items():
        args += ["--set", f"{key}={value}"]
    return args


def run_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_training(run_dir: Path, shard_dir: Path, nproc: int = 1, config: str = "tiny", timeout: int = 600, **sets):
    """Trains to completion; returns the per-step losses from metrics.jsonl."""
    cmd = training_command(nproc) + ["--config", config] + tiny_overrides(run_dir, shard_dir, **sets)
    result = subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"training failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return step_losses(run_dir)


def step_losses(run_dir: Path) -> list[float]:
    lines = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [line["loss"] for line in lines if "loss" in line]


def start_training(run_dir: Path, shard_dir: Path, nproc: int = 1, extra_env=None, **sets) -> subprocess.Popen:
    cmd = training_command(nproc) + ["--config", "tiny"] + tiny_overrides(run_dir, shard_dir, **sets)
    env = {**run_env(), **(extra_env or {})}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, text=True)


def wait_for_checkpoint(run_dir: Path, tag: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    marker = Path(run_dir) / "checkpoints" / tag / "COMPLETE"
    latest = Path(run_dir) / "checkpoints" / "latest"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if marker.exists() and latest.exists() and latest.read_text().strip() == tag:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited ({proc.returncode}) before {tag}:\n{proc.stdout.read()[-4000:]}")
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint {tag} within {timeout}s")


def kill_group(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
