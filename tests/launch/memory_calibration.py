"""What the memory calibration shares: the run's configs (ZeRO-3, zero.Init, optimizer offloaded to the CPU, fp32
on the CPU accelerator) and launching it on 2 CPU ranks."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pretrain.config import TrainConfig
from pretrain.model import ModelConfig
from tests.launch.launch_runs import REPO, free_port, launch_env

CALIBRATION_JSON = REPO / "ds_configs" / "zero3_offload.json"


def calibration_configs(layers: int, d_model: int) -> tuple[ModelConfig, TrainConfig, Path]:
    model = ModelConfig(arch="llama", n_layers=layers, d_model=d_model, n_heads=max(1, d_model // 64), max_seq_len=128,
                        vocab_size=8000)
    train = TrainConfig(micro_batch_size=2, seq_len=128, max_steps=10, warmup_steps=1)
    return model, train, CALIBRATION_JSON


def measure(layers: int, d_model: int, out: Path, ranks: int = 2, steps: int = 2) -> list[dict]:
    """Per-rank records of tests/launch/memory_calibration_rank.py on `ranks` CPU ranks."""
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", str(free_port()),
               str(REPO / "tests" / "launch" / "memory_calibration_rank.py"), "--layers", str(layers), "--d-model", str(d_model),
               "--steps", str(steps), "--out", str(out)]
    result = subprocess.run(command, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]
