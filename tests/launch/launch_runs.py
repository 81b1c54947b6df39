"""What the launch tests share: tiny training arguments, a clean environment, reading a run back."""
from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def tiny_train_args(run_dir: Path, shard_dir: Path, steps: int = 6, **sets) -> list[str]:
    """`lmforge train` arguments for a 2-layer, d=32 llama that trains in seconds on CPU."""
    values = {
        "run.dir": str(run_dir), "data.path": f"[{shard_dir}]", "run.log_interval": 1, "run.progress_bar": "false",
        "run.tensorboard": "false", "train.max_steps": steps, "train.micro_batch_size": 2, "train.seq_len": 32,
        "train.warmup_steps": 1, "train.eval_interval": 0, "train.save_interval": 0, "model.n_layers": 2,
        "model.d_model": 32, "model.n_heads": 4, "model.n_kv_heads": 2, **sets,
    }
    args = ["--config", "tiny"]
    for key, value in values.items():
        args += ["--set", f"{key}={value}"]
    return args


def launch_env(**extra: str) -> dict[str, str]:
    """This interpreter's venv first on PATH, the repo importable, one thread per rank, no SLURM_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI_", "PMIX_"))}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCH_CUDA_ARCH_LIST"):
        env.pop(key, None)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def logged_steps(run_dir: Path) -> list[int]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [record["step"] for record in map(json.loads, filter(str.strip, lines)) if "loss" in record]


def optimizer_shards(run_dir: Path, step: int) -> list[str]:
    """ZeRO's per-rank optimizer files of a checkpoint: one per data-parallel rank that saved."""
    folder = Path(run_dir) / "checkpoints" / f"step_{step:08d}"
    assert (folder / "COMPLETE").is_file(), f"{folder} is not a complete checkpoint"
    return sorted(p.name for p in folder.glob("zero_pp_rank_*_optim_states.pt"))


TWO_RANK_SHARDS = ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
