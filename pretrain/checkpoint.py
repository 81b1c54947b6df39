"""Checkpoints through DeepSpeed's engine, with an atomic `latest` and every RNG state.

Layout (docs/formats.md): RUN_DIR/checkpoints/<tag>/ is DeepSpeed's own checkpoint folder (model,
optimizer and scheduler states for any ZeRO stage) plus `rng_rank<r>.pt` per rank and a
`COMPLETE` marker written last; RUN_DIR/checkpoints/latest names the newest complete tag, in
DeepSpeed's format, replaced atomically only after every rank has finished writing.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.errors import LmforgeError
from pretrain import distributed

COMPLETE_MARKER = "COMPLETE"
LATEST_FILE = "latest"


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def step_of_tag(tag: str) -> int:
    return int(tag.removeprefix("step_"))


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def complete_tags(run_dir: Path) -> list[str]:
    """Tags whose every file was written (oldest first)."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if p.is_dir() and (p / COMPLETE_MARKER).is_file()]
    return sorted(tags, key=step_of_tag)


def latest_tag(run_dir: Path) -> str | None:
    """The tag `latest` names, if that checkpoint is complete; None for a fresh run."""
    latest = checkpoints_dir(run_dir) / LATEST_FILE
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    if not (checkpoints_dir(run_dir) / tag / COMPLETE_MARKER).is_file():
        raise LmforgeError(
            f"{latest} names '{tag}', which is missing or incomplete; "
            f"complete checkpoints: {', '.join(complete_tags(run_dir)) or 'none'}"
        )
    return tag


def save(engine, run_dir: Path, step: int, client_state: dict[str, Any], keep_last: int) -> str:
    """Saves on every rank; returns the tag. `latest` moves only once all ranks are done."""
    root = checkpoints_dir(run_dir)
    tag = tag_for_step(step)
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    torch.save(rng_state(), root / tag / f"rng_rank{distributed.rank()}.pt")
    distributed.barrier()
    if distributed.is_main():
        write_atomic(root / tag / COMPLETE_MARKER, f"{step}\n".encode())
        write_atomic(root / LATEST_FILE, tag.encode())
        _prune(run_dir, keep_last, keep=tag)
    distributed.barrier()
    return tag


def _prune(run_dir: Path, keep_last: int, keep: str) -> None:
    tags = complete_tags(run_dir)
    for old in tags[: max(0, len(tags) - keep_last)]:
        if old != keep:
            shutil.rmtree(checkpoints_dir(run_dir) / old, ignore_errors=True)


def load(engine, run_dir: Path, tag: str) -> dict[str, Any]:
    """Restores model, optimizer, scheduler, loss scaler and this rank's RNG; returns client state."""
    root = checkpoints_dir(run_dir)
    path, client_state = engine.load_checkpoint(str(root), tag=tag)
    if path is None:
        raise LmforgeError(f"{root / tag}: DeepSpeed could not load this checkpoint")
    rng_file = root / tag / f"rng_rank{distributed.rank()}.pt"
    if rng_file.is_file():
        restore_rng_state(torch.load(rng_file, weights_only=False))
    return client_state or {}


def consolidated_state_dict(run_dir: Path, tag: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """fp32 model weights merged from any ZeRO stage (DeepSpeed's zero_to_fp32), and the tag used."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = tag or latest_tag(run_dir)
    if tag is None:
        raise LmforgeError(f"{checkpoints_dir(run_dir)}: no checkpoint found (train first, or pass --step)")
    folder = checkpoints_dir(run_dir) / tag
    if not (folder / COMPLETE_MARKER).is_file():
        raise LmforgeError(f"{folder}: checkpoint missing or incomplete")
    try:
        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoints_dir(run_dir)), tag=tag)
    except (FileNotFoundError, ValueError, RuntimeError, KeyError) as err:
        raise LmforgeError(f"{folder}: unreadable DeepSpeed checkpoint ({type(err).__name__}: {err})") from None
    return {k: v.float() for k, v in state.items()}, tag
