"""Checkpoints through DeepSpeed's engine, with an atomic `latest`, every RNG state and a checked record.

Layout (docs/formats.md): RUN_DIR/checkpoints/<tag>/ is DeepSpeed's own checkpoint folder (model,
optimizer and scheduler states for any ZeRO stage) plus `rng_rank<r>.pt` per rank and a
`COMPLETE` record written last (JSON: step, world size, ZeRO stage, and the size and sha256 of
every file); RUN_DIR/checkpoints/latest names the newest complete tag, in DeepSpeed's format,
replaced atomically only after every rank has finished writing. So a run killed at any moment
leaves `latest` on a complete checkpoint, and older ones are pruned only after a newer one is.
With train.checkpoint_writer background the same files are written by a thread from a host copy
(pretrain/background_checkpoint.py) and the next save (or `finish_pending_save`) waits for them.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge import distributed
from lmforge.errors import LmforgeError
from lmforge.files import write_atomic
from lmforge.out_of_space import describe as describe_space, is_out_of_space
from lmforge.run_layout import CHECKPOINTS_DIR, COMPLETE_MARKER, DAMAGED_MARKER, LATEST_FILE  # noqa: F401 (re-exported)
from pretrain import background_checkpoint, faults
from pretrain.universal_checkpoint import load_zero0_optimizer_state

RECORD_VERSION = 1
TAG_PATTERN = re.compile(r"step_(\d+)")


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def step_of_tag(tag: str) -> int:
    return int(tag.removeprefix("step_"))


def rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and plain values, so `torch.load(weights_only=True)` reads it."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def read_record(folder: Path) -> dict[str, Any]:
    """The COMPLETE record of a checkpoint folder ({"step": N} for one written before records)."""
    data = (Path(folder) / COMPLETE_MARKER).read_bytes()
    try:
        record = json.loads(data.decode("utf-8"))
    except ValueError:  # not UTF-8 or not JSON: a damaged record
        raise LmforgeError(f"{Path(folder) / COMPLETE_MARKER}: not a checkpoint record (expected JSON)") from None
    if isinstance(record, int):
        return {"step": record}
    if not isinstance(record, dict) or not isinstance(record.get("files", {}), dict):
        raise LmforgeError(f"{Path(folder) / COMPLETE_MARKER}: not a checkpoint record (expected a JSON object with its files)")
    return record


def complete_tags(run_dir: Path) -> list[str]:
    """Tags whose every file was written (oldest first)."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if TAG_PATTERN.fullmatch(p.name) and (p / COMPLETE_MARKER).is_file()]
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


def _all_gather(value: Any) -> list[Any]:
    import torch.distributed as dist

    if not distributed.is_initialized() or distributed.world_size() == 1:
        return [value]
    out: list[Any] = [None] * distributed.world_size()
    dist.all_gather_object(out, value)
    return out


def _my_share(names: list[str]) -> list[str]:
    """Files this rank hashes: every world_size-th, so checksums cost each rank a fraction."""
    return names[distributed.rank()::distributed.world_size()]


def _file_checksums(folder: Path) -> dict[str, dict[str, Any]]:
    from lmforge.files import sha256_file

    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    mine = {name: {"bytes": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)} for name in _my_share(names)}
    merged: dict[str, dict[str, Any]] = {}
    for part in _all_gather(mine):
        merged.update(part)
    return dict(sorted(merged.items()))


def _discard(folder: Path) -> None:
    """Removes a checkpoint folder, its COMPLETE marker first: never a complete-looking partial one."""
    (folder / COMPLETE_MARKER).unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)


def _checkpoint_bytes(run_dir: Path, tag: str) -> int | None:
    """Bytes of a complete checkpoint, from its record (None if unknown)."""
    try:
        files = read_record(checkpoints_dir(run_dir) / tag).get("files", {})
        return sum(int(f["bytes"]) for f in files.values()) or None
    except (LmforgeError, OSError, KeyError, TypeError, ValueError):
        return None


def _save_failed(folder: Path, reason: str, run_dir: Path) -> LmforgeError:
    kept = complete_tags(run_dir)
    previous = f"the previous checkpoint {checkpoints_dir(run_dir) / kept[-1]} is kept" if kept else "no earlier checkpoint exists"
    space = ""
    if is_out_of_space(RuntimeError(reason)):
        space = f"; {describe_space(folder.parent, _checkpoint_bytes(run_dir, kept[-1]) if kept else None)}"
    return LmforgeError(
        f"{folder}: checkpoint not written ({reason}); {previous}; the partial folder was removed{space}; free space under run.dir "
        "(or lower train.keep_last, or move run.dir) and rerun the same command to resume"
    )


def _describe_os_error(err: OSError) -> str:
    where = f": {err.filename}" if err.filename else ""
    return f"rank {distributed.rank()}: {err.strerror or err}{where}"


def save(engine, run_dir: Path, step: int, client_state: dict[str, Any], keep_last: int,
         record: dict[str, Any] | None = None, writer: str = "blocking") -> str:
    """Saves on every rank; returns the tag. `latest` moves only once all ranks are done.

    `record` adds keys to the COMPLETE record (the trainer puts the model config there). A failed
    write (disk full, read-only dir) removes the partial folder, keeps the previous checkpoint and
    raises LmforgeError on every rank. `writer` is train.checkpoint_writer: "blocking" returns once
    the checkpoint is complete; "background" once the state is copied to host memory
    (pretrain/background_checkpoint.py), the files, COMPLETE and `latest` follow from a thread, and
    the next save or `finish_pending_save` waits for them (and raises if they failed).
    """
    background = writer == "background"
    if background:
        finish_pending_save(engine)
        writer_engine = background_checkpoint.install(engine)
    root = checkpoints_dir(run_dir)
    tag = tag_for_step(step)
    folder = root / tag
    if distributed.is_main():
        _discard(folder)  # a partial or stale folder of this tag from an earlier, killed run
    distributed.barrier()
    started = time.perf_counter()
    error = None
    try:
        engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
        rng_path = folder / f"rng_rank{distributed.rank()}.pt"
        if background:
            pending = writer_engine.take_pending() + [(rng_state(), rng_path, None)]
        else:
            torch.save(rng_state(), rng_path)
            faults.during_save(step, str(folder))
    except OSError as err:
        error = _describe_os_error(err)
    except RuntimeError as err:  # torch.save on a full disk raises RuntimeError, not OSError
        if not is_out_of_space(err):
            raise
        error = f"rank {distributed.rank()}: {str(err).strip().splitlines()[-1][:200]}"
    errors = [e for e in _all_gather(error) if e]
    if errors:
        if background:
            writer_engine.take_pending()
        if distributed.is_main():
            _discard(folder)
        distributed.barrier()
        raise _save_failed(folder, errors[0], run_dir)
    entry = {
        "format_version": RECORD_VERSION, "tag": tag, "step": step, "world_size": distributed.world_size(),
        "data_parallel_size": int(getattr(engine, "dp_world_size", distributed.world_size())),
        "zero_stage": int(engine.zero_optimization_stage()), **(record or {}),
    }
    if background:
        blocked = time.perf_counter() - started
        main = distributed.is_main()
        commit = (lambda files: _commit(run_dir, tag, {**entry, "writer": writer, "blocked_seconds": round(blocked, 3),
                                                       "files": files}, keep_last)) if main else None
        writer_engine.in_flight = background_checkpoint.BackgroundWrite(
            folder, pending, distributed.rank(), distributed.world_size(), writer_engine.zipfile_serialization,
            commit=commit, abort=(lambda: _discard(folder)) if main else None,
            before_record=lambda where: faults.during_save(step, str(where)), blocked_seconds=blocked)
        return tag
    files = _file_checksums(folder)
    status = None
    if distributed.is_main():
        try:
            _commit(run_dir, tag, {**entry, "files": files}, keep_last)
        except OSError as err:
            _discard(folder)
            status = _describe_os_error(err)
    status = distributed.broadcast_object(status)
    if status:
        raise _save_failed(folder, status, run_dir)
    return tag


def _commit(run_dir: Path, tag: str, entry: dict[str, Any], keep_last: int) -> None:
    """Main rank: the COMPLETE record, then `latest`, then pruning (OSError propagates)."""
    root = checkpoints_dir(run_dir)
    write_atomic(root / tag / COMPLETE_MARKER, (json.dumps(entry, indent=1) + "\n").encode())
    write_atomic(root / LATEST_FILE, tag.encode())
    _prune(run_dir, keep_last, keep=tag)


def finish_pending_save(engine) -> dict[str, float] | None:
    """Every rank: waits for the background write of the last save (if any) to be complete.

    Returns {"blocked_seconds", "write_seconds"} of that save (None if none was in flight); raises
    LmforgeError on every rank if any rank's write failed (the partial folder is removed and the
    previous checkpoint stays `latest`).
    """
    writer_engine = getattr(engine, "checkpoint_engine", None)
    write = getattr(writer_engine, "in_flight", None)
    if write is None:
        return None
    writer_engine.in_flight = None
    errors = [e for e in _all_gather(write.wait_own_files()) if e]
    if errors:
        write.give_up()  # the main rank stops waiting for records the failed ranks may never write
    status = distributed.broadcast_object(write.wait())
    if errors or status:
        distributed.barrier()
        raise _save_failed(write.folder, errors[0] if errors else status, write.folder.parent.parent)  # RUN_DIR/checkpoints/<tag>
    return {"blocked_seconds": write.blocked_seconds, "write_seconds": write.write_seconds or 0.0}


def settle_pending_save(engine, timeout: float = 600.0) -> None:
    """This rank alone (no collective: for a run stopping on an error): lets the write in flight end,
    so the last save before the error completes if every rank gets here; a failed one stays incomplete."""
    write = getattr(getattr(engine, "checkpoint_engine", None), "in_flight", None)
    if write is not None:
        engine.checkpoint_engine.in_flight = None
        write.wait(timeout)


def _prune(run_dir: Path, keep_last: int, keep: str) -> None:
    """Deletes all but the newest keep_last complete checkpoints, and every incomplete folder."""
    root = checkpoints_dir(run_dir)
    tags = complete_tags(run_dir)
    for old in tags[: max(0, len(tags) - keep_last)]:
        if old != keep:
            _discard(root / old)
    for folder in root.iterdir():
        if TAG_PATTERN.fullmatch(folder.name) and folder.is_dir() and not (folder / COMPLETE_MARKER).exists():
            shutil.rmtree(folder, ignore_errors=True)  # left by a killed save, or marked damaged


def damage(run_dir: Path, tag: str) -> list[str]:
    """What is wrong with checkpoint `tag`'s files against its record (empty: intact).

    Every rank checks a share of the files (sizes, then sha256) and all get the full list.
    """
    from lmforge.files import sha256_file

    folder = checkpoints_dir(run_dir) / tag
    files = read_record(folder).get("files", {})
    problems = []
    for name in _my_share(sorted(files)):
        path, expected = folder / name, files[name]
        if not path.is_file():
            problems.append(f"{path}: missing (listed in {folder / COMPLETE_MARKER})")
        elif path.stat().st_size != expected["bytes"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, the checkpoint record says {expected['bytes']}")
        elif sha256_file(path) != expected["sha256"]:
            problems.append(f"{path}: sha256 does not match the checkpoint record (the file is damaged)")
    return sorted(p for part in _all_gather(problems) for p in part)


def mark_damaged(run_dir: Path, tag: str, reason: str, fallback: str) -> None:
    """Main rank: `tag` is no longer complete (its COMPLETE becomes DAMAGED) and `latest` names `fallback`."""
    folder = checkpoints_dir(run_dir) / tag
    if (folder / COMPLETE_MARKER).is_file():
        os.replace(folder / COMPLETE_MARKER, folder / DAMAGED_MARKER)
        with open(folder / DAMAGED_MARKER, "a") as handle:
            handle.write(f"\n# damaged: {reason}\n")
    write_atomic(checkpoints_dir(run_dir) / LATEST_FILE, fallback.encode())


def load(engine, run_dir: Path, tag: str, load_dir: Path | None = None,
         zero0_groups: list[list[torch.nn.Parameter]] | None = None) -> dict[str, Any]:
    """Restores model, optimizer, scheduler, loss scaler and this rank's RNG; returns client state.

    `load_dir` is where DeepSpeed reads `tag` from when not RUN_DIR/checkpoints (a universal copy).
    `zero0_groups`: the checkpoint is ZeRO-0's and the engine ZeRO-1/2's; the model's parameters in the
    optimizer's group order (pretrain.universal_checkpoint.load_zero0_optimizer_state).
    """
    root = checkpoints_dir(run_dir)
    source = Path(load_dir) if load_dir is not None else root
    try:
        path, client_state = engine.load_checkpoint(str(source), tag=tag, load_optimizer_states=zero0_groups is None)
        if path is not None and zero0_groups is not None:  # DeepSpeed hands the unread ZeRO-0 state back as client state
            load_zero0_optimizer_state(engine.optimizer, (client_state or {}).pop("optimizer", None), zero0_groups, source / tag)
    except (RuntimeError, KeyError, ValueError, OSError, AssertionError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise LmforgeError(f"{source / tag}: DeepSpeed could not load this checkpoint ({type(err).__name__}: {first[:300]})") from None
    if path is None:
        raise LmforgeError(f"{source / tag}: DeepSpeed could not load this checkpoint")
    rng_file = root / tag / f"rng_rank{distributed.rank()}.pt"
    if rng_file.is_file():  # absent for ranks a smaller run did not have
        restore_rng_state(_load_rng(rng_file))
    if load_dir is not None:
        _restore_group_hyperparameters(engine.optimizer, source / tag)
    _replay_cpu_adam_products(engine.optimizer)
    _unshare_step_counters(engine.optimizer)
    return client_state or {}


def _restore_group_hyperparameters(optimizer, universal_tag: Path) -> None:
    """Gives each optimizer group back its own saved hyperparameters after a ZeRO-3 universal load.

    DeepSpeed's ZeRO-3 universal loader (stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3)
    copies the first saved group's values into every group, so the no-decay group (norms, biases,
    embeddings) came back with the decayed group's weight_decay and name. The saved groups are in the
    same file, in the same order.
    """
    state_file = universal_tag / "zero" / "optimizer_state.pt"
    if not state_file.is_file():  # ZeRO-1/2's universal form restores each group itself
        return
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    # The file also holds the whole model's fp32 weights and Adam moments (12 bytes a parameter), which DeepSpeed
    # has just read: mapped, not read again, since only the groups are needed.
    with torch.serialization.safe_globals([ZeroStageEnum, LossScaler, DynamicLossScaler]):  # what the file holds besides tensors
        saved = torch.load(state_file, map_location="cpu", weights_only=True, mmap=True)
    if saved.get("zero_stage") != 3:
        return
    base = getattr(optimizer, "optimizer", optimizer)  # ZeRO wraps the torch-level optimizer
    saved_groups = saved["optimizer_state_dict"]["param_groups"]
    if len(saved_groups) != len(base.param_groups):
        raise LmforgeError(f"{state_file}: {len(saved_groups)} optimizer groups saved, {len(base.param_groups)} in this run")
    for group, saved_group in zip(base.param_groups, saved_groups):
        group.update({key: value for key, value in saved_group.items() if key != "params"})


def _unshare_step_counters(optimizer) -> None:
    """Gives every parameter's torch-Adam `step` tensor its own copy.

    DeepSpeed's universal-checkpoint loader (ZeRO-3) assigns one loaded `step` tensor to every
    flat parameter; torch's fused Adam increments each parameter's counter in place, so a shared one
    would count every parameter group's update and skew the bias correction after the first step.
    """
    base = getattr(optimizer, "optimizer", optimizer)  # ZeRO wraps the torch-level optimizer
    seen: set[int] = set()
    for state in getattr(base, "state", {}).values():
        step = state.get("step") if isinstance(state, dict) else None
        if torch.is_tensor(step):
            if id(step) in seen:
                state["step"] = step.clone()
            seen.add(id(state["step"]))


def _replay_cpu_adam_products(optimizer) -> None:
    """Makes DeepSpeed's CPU FusedAdam round the next update as an uninterrupted run would.

    Its C++ kernel keeps beta1^t and beta2^t as running float products (one multiply per step) and
    a fresh process starts them with pow(beta, t), which can differ in the last bit: the updates
    after a resume would then differ by an ulp. Replaying steps 1..t on empty tensors rebuilds the
    same products. (The CUDA kernel computes pow every step; nothing to do there.)
    """
    base = getattr(optimizer, "optimizer", optimizer)  # ZeRO wraps the torch-level optimizer
    kernel = getattr(base, "multi_tensor_adam", None)
    states = [s for s in getattr(base, "state", {}).values() if "step" in s and "exp_avg" in s]
    if kernel is None or not states or states[0]["exp_avg"].device.type != "cpu":
        return
    group = base.param_groups[0]
    if any(tuple(g["betas"]) != tuple(group["betas"]) for g in base.param_groups):
        return  # the kernel recomputes with pow whenever the betas change: nothing is carried over
    steps = max(int(s["step"]) for s in states)  # FusedAdam counts on the last parameter of each group
    empty = [torch.empty(0)]
    beta1, beta2 = group["betas"]
    for step in range(1, steps + 1):
        kernel(2048 * 32, base._dummy_overflow_buf, [empty, empty, empty, empty], group["lr"], beta1, beta2,
               group["eps"], step, base.adam_w_mode, 1 if group["bias_correction"] else 0, group["weight_decay"])


def _load_rng(path: Path) -> dict[str, Any]:
    import pickle

    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError:  # written before RNG states were tensors: numpy arrays inside
        with torch.serialization.safe_globals([np.ndarray, np.dtype, np.dtypes.UInt32DType, np._core.multiarray._reconstruct]):
            state = torch.load(path, weights_only=True)
        kind, keys, *rest = state["numpy"]
        state["numpy"] = (kind, torch.from_numpy(np.asarray(keys).astype(np.int64)), *rest)
        return state


def consolidated_state_dict(run_dir: Path, tag: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """fp32 model weights merged from any ZeRO stage (DeepSpeed's zero_to_fp32), and the tag used."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = tag or latest_tag(run_dir)
    if tag is None:
        raise LmforgeError(f"{checkpoints_dir(run_dir)}: no checkpoint found (train first, or pass --step)")
    folder = checkpoints_dir(run_dir) / tag
    if not (folder / COMPLETE_MARKER).is_file():
        raise LmforgeError(f"{folder}: checkpoint missing or incomplete")
    from pretrain.pipeline_checkpoint import is_pipeline_checkpoint, pipeline_state_dict_to_model

    if is_pipeline_checkpoint(folder):
        return pipeline_state_dict_to_model(folder), tag
    try:
        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoints_dir(run_dir)), tag=tag)
    except (FileNotFoundError, ValueError, RuntimeError, KeyError) as err:
        raise LmforgeError(f"{folder}: unreadable DeepSpeed checkpoint ({type(err).__name__}: {err})") from None
    return {k: v.float() for k, v in state.items()}, tag
