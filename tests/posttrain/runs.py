"""Runs real post-training jobs for the tests: `python -m lmforge.cli VERB` (1 rank) or torchrun (2 ranks)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]

VERB_MODULES = {"sft": "posttrain.sft", "reward": "posttrain.reward_model", "ppo": "posttrain.ppo", "dpo": "posttrain.dpo", "grpo": "posttrain.grpo"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def command(verb: str, nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "lmforge.cli", verb]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(_free_port()), "-m", VERB_MODULES[verb]]


def tiny_model_sets(tokenizer_dir: Path, run_dir: Path) -> dict[str, Any]:
    """A 2-layer, 32-wide Llama from scratch with the fixture's tokenizer; no progress bar or TensorBoard."""
    return {
        "run.dir": run_dir,
        "run.progress_bar": "false",
        "run.tensorboard": "false",
        "run.log_interval": 1,
        "init.from_run": "null",
        "init.tokenizer": tokenizer_dir,
        "model.n_layers": 2,
        "model.d_model": 32,
        "model.n_heads": 4,
        "model.n_kv_heads": 2,
        "model.max_seq_len": 64,
        "train.seq_len": 64,
        "train.micro_batch_size": 8,
        "train.warmup_steps": 2,
        "train.weight_decay": 0.0,
        "train.eval_interval": 0,
        "train.save_interval": 0,
        "data.max_prompt_len": 24,
        "deepspeed.config": "ds_configs/zero0.json",
    }


def env() -> dict[str, str]:
    out = dict(os.environ)
    out["PYTHONPATH"] = str(REPO) + os.pathsep + out.get("PYTHONPATH", "")
    out.setdefault("OMP_NUM_THREADS", "1")
    return out


def run_verb(verb: str, sets: dict[str, Any], nproc: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    """Runs the verb with `--set key=value` for each item; returns the finished process (output captured)."""
    args = command(verb, nproc) + ["--config", verb]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    return subprocess.run(args, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)


def run_ok(verb: str, sets: dict[str, Any], nproc: int = 1) -> list[dict]:
    """Runs the verb to completion and returns RUN_DIR/metrics.jsonl's records."""
    result = run_verb(verb, sets, nproc)
    assert result.returncode == 0, f"{verb} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return read_metrics(Path(sets["run.dir"]))


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path
