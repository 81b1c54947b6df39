"""`python -m launch.memory_compare ROWS.json`: launch.memory_estimate's peaks next to bench/max_model.py's measured ones.

bench/ may not import launch/ (.importlinter: independent layers), so the comparison reads the rows bench
wrote (--json), each with its resolved model, train and DeepSpeed configs, and prints per row: measured
and estimated GPU peak (torch.cuda.max_memory_allocated) and host peak (rank 0's ru_maxrss, so one rank's
estimate), and estimate / measured - 1, the number the 15% target is about.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from launch.memory_estimate import GIB, estimate_memory
from lmforge.errors import LmforgeError, run_cli
from pretrain.config import TrainConfig
from pretrain.model import ModelConfig


def compared(row: dict) -> dict:
    """The row's measured and estimated peaks in bytes (None where not measured, e.g. no GPU)."""
    config = row["config"]
    estimate = estimate_memory(ModelConfig(**config["model"]), TrainConfig(**config["train"]), config["ds_config"],
                               config["world"], device=config["device"], ranks_per_host=1)
    return {"row": row["row"], "gpu": (row["gpu_peak_bytes"], estimate.gpu_peak if config["device"] == "cuda" else None),
            "host": (row["host_peak_bytes"], estimate.host_peak)}


def _cell(measured: int | None, estimated: int | None) -> str:
    if measured is None or estimated is None:
        return f"{'-':>8} {'-':>8} {'-':>6}"
    return f"{measured / GIB:>8.2f} {estimated / GIB:>8.2f} {100 * (estimated / measured - 1):>+5.0f}%"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.memory_compare", description=__doc__.splitlines()[0])
    parser.add_argument("rows", type=Path, help="bench/max_model.py --json output")
    args = parser.parse_args(argv)
    try:
        rows = json.loads(args.rows.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise LmforgeError(f"{args.rows}: not a bench/max_model.py --json file ({err}); rerun it with --json") from None
    print(f"{'row':<48} {'GPU GiB':>8} {'estimate':>8} {'diff':>6} {'host GiB':>8} {'estimate':>8} {'diff':>6}")
    for row in rows:
        if "error" in row:
            print(f"{row['row']:<48} failed: {row['error']}")
            continue
        found = compared(row)
        print(f"{found['row']:<48} {_cell(*found['gpu'])} {_cell(*found['host'])}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
