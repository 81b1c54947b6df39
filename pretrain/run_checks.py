"""Checks `lmforge train` makes before any process group exists: intact shards, a writable run dir
with room for its checkpoints. Each failure is one LmforgeError naming the file or key."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from lmforge.errors import LmforgeError
from pretrain.config import DataConfig, resolve_repo_path
from pretrain.model import ModelConfig, Transformer


def verify_shards(data: DataConfig) -> None:
    """Every shard file's size and sha256 against its manifest (a flipped byte or a truncated file)."""
    from data_prep.manifest import verify_manifest

    for path in data.path:
        verify_manifest(resolve_repo_path(path))  # cached per (file, size, mtime): training does not hash twice


def open_datasets(data: DataConfig, seq_len: int, seed: int) -> None:
    """Opens the shards as training will (index against .bin: dtype, sizes, windows), so a shard set that
    passes its checksums but cannot be read fails before run.dir exists."""
    from pretrain.rank_batches import TrainingData

    TrainingData(data, seq_len, seed, 0, 1)


def check_run_dir(run_dir: Path) -> None:
    """Creates run.dir and writes a probe file in it; an OSError becomes one line."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write_probe{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise LmforgeError(f"run.dir = {run_dir}: not writable ({err.strerror})") from None


def parameter_count(model: ModelConfig) -> int:
    """Parameters of the model, built on the meta device: no memory, any size."""
    with torch.device("meta"):
        return Transformer(model).num_params()


def check_disk_space(run_dir: Path, model: ModelConfig, keep_last: int) -> None:
    """Enough free space under run.dir for keep_last + 1 checkpoints (the estimate of `lmforge preflight`).

    A run.dir that does not exist yet is measured at its nearest existing parent, so nothing is
    created for a run that cannot fit."""
    from pretrain.checkpoint_space import BYTES_PER_PARAM, CheckpointSpace, checkpoint_space, human_bytes

    params = parameter_count(model)
    if run_dir.is_dir():
        space = checkpoint_space(run_dir, params, keep_last)
    else:
        parent = next((p for p in run_dir.parents if p.is_dir()), Path.cwd())
        each = params * BYTES_PER_PARAM
        space = CheckpointSpace(each, each * (keep_last + 1), shutil.disk_usage(parent).free)
    if space.bytes_needed > space.bytes_free:
        raise LmforgeError(
            f"run.dir = {run_dir}: {human_bytes(space.bytes_free)} free, but checkpoints need {human_bytes(space.bytes_needed)} "
            f"(~{human_bytes(space.bytes_each)} each: {params:,} params × {BYTES_PER_PARAM} bytes, up to {keep_last + 1} on disk "
            f"with train.keep_last = {keep_last}); free space, lower train.keep_last or move run.dir"
        )
