"""Resuming a ZeRO checkpoint on a different number of data-parallel ranks.

ZeRO 1-3 partition the optimizer state (and, for stage 3, the weights) by data-parallel rank, and
DeepSpeed refuses to load such a checkpoint on another number of ranks. Its universal checkpoint
format stores every parameter whole (`zero/<name>/{fp32,exp_avg,exp_avg_sq}.pt`) and can be
loaded on any number of ranks with `"checkpoint": {"load_universal": true}` in the JSON. We run
DeepSpeed's own converter (`deepspeed.checkpoint.ds_to_universal`) once per checkpoint, on the
main rank, into RUN_DIR/checkpoints/<tag>/universal/<tag>/ (so pruning the tag removes it too).
ZeRO-0 checkpoints hold the whole optimizer state and load on any number of ranks as they are.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from lmforge import distributed
from lmforge.errors import LmforgeError
from lmforge.run_layout import UNIVERSAL_DIR



def needs_universal(record: dict[str, Any], data_parallel_size: int, zero_stage: int, folder: Path) -> bool:
    """True when `record`'s checkpoint must go through the universal format to load here."""
    saved_dp, saved_stage = record.get("data_parallel_size"), record.get("zero_stage")
    if saved_dp is None or saved_stage is None:
        return False  # written before records had these: DeepSpeed loads it or says why not
    # ZeRO-1 and ZeRO-2 share the universal form (a ZeRO-2 JSON runs as ZeRO-1 on one rank: pretrain.ds_config.for_one_zero_rank)
    if saved_stage != zero_stage and not ({saved_stage, zero_stage} == {1, 2} and saved_dp != data_parallel_size):
        raise LmforgeError(
            f"{folder}: written with ZeRO-{saved_stage} but deepspeed.config is ZeRO-{zero_stage}; "
            f"resume with a ZeRO-{saved_stage} JSON (e.g. ds_configs/zero{saved_stage}.json)"
        )
    return saved_stage > 0 and saved_dp != data_parallel_size


def _workers() -> int:
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def _convert(folder: Path, target: Path) -> None:
    partial = folder / f"{UNIVERSAL_DIR}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(folder),
           "--output_folder", str(partial / folder.name), "--num_extract_workers", str(_workers()),
           "--num_merge_workers", str(_workers()), "--inject_missing_state"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        tail = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()[-1]
        raise RuntimeError(f"{folder}: DeepSpeed's ds_to_universal failed ({tail})")
    os.replace(partial, target)


def universal_copy(folder: Path) -> Path:
    """The directory DeepSpeed loads `folder`'s tag from in universal format (converted on first use)."""
    target = folder / UNIVERSAL_DIR
    failure = None
    if distributed.is_main() and not target.is_dir():
        print(f"converting {folder} to DeepSpeed's universal checkpoint format (a different number of ranks)", flush=True)
        try:
            _convert(folder, target)
        except (RuntimeError, OSError) as err:
            failure = str(err)
    failure = distributed.broadcast_object(failure)
    if failure:
        raise LmforgeError(failure)
    return target


