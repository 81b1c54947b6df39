"""Will the run's checkpoints fit on the disk of run.dir?

A DeepSpeed checkpoint holds the weights and the AdamW states: at most about 16 bytes per parameter
(ZeRO-1/2 with fp32 weights: the module's own fp32 copy, the fp32 master partition and two fp32
moments; ZeRO-0 and ZeRO-3 write 12, docs/performance.md): the estimate takes the largest.
At most `keep_last + 1` are on disk at once: a new one is complete before the oldest goes.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from lmforge.run_layout import checkpoints_dir

BYTES_PER_PARAM = 16


@dataclass(frozen=True)
class CheckpointSpace:
    bytes_each: int
    bytes_needed: int
    """keep_last + 1 checkpoints, less what this run's checkpoints already take (they are replaced)."""
    bytes_free: int


def _tree_bytes(folder: Path) -> int:
    if not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def checkpoint_space(run_dir: Path, num_params: int, keep_last: int) -> CheckpointSpace:
    """The estimate for `run_dir` (which must exist)."""
    each = num_params * BYTES_PER_PARAM
    existing = _tree_bytes(checkpoints_dir(run_dir))
    needed = max(each, each * (keep_last + 1) - existing)
    return CheckpointSpace(each, needed, shutil.disk_usage(run_dir).free)


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(count) < 1000 or unit == "PB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")
