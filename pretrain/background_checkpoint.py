"""Checkpoints written in the background: training stops only while the state is copied to host memory.

`BackgroundCheckpointEngine` is a DeepSpeed checkpoint engine (runtime/checkpoint_engine/): DeepSpeed's
`engine.save_checkpoint` still decides every file and what goes in it, so the folder is the one the
torch engine writes (zero_to_fp32, universal checkpoints and lmforge's resume read it unchanged).
Its `save` copies each state dict's tensors into host buffers (pinned for a GPU, reused from one save
to the next) and returns; `BackgroundWrite` then torch.saves the copies from a thread, hashing the
bytes as they go out, fsyncs each file and leaves a small per-rank record of what it wrote. The main
rank's thread waits for every rank's record and only then runs the commit it was given (the
COMPLETE record, `latest`, pruning): a run killed meanwhile leaves `latest` on the previous
checkpoint. The next save, and the end of training, wait for the write in flight. A file whose host
copy would not fit in this rank's share of the available host memory is written before `save`
returns, as the blocking writer would (a note says so once).

DeepSpeed's own decoupled engine (a writer process fed through a queue) fails here at ZeRO-1/2
("Cowardly refusing to serialize non-leaf tensor which requires_grad": the fp32 partitions) and
shares the live tensors, so its commit must finish before the next optimizer step; its `fast`
writer needs the aio op (libaio), which neither the GPU image nor the CPU CI has (docs/performance.md).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine, CheckpointCommitInfo
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from lmforge.files import write_atomic

WRITTEN_RECORD = "written_rank{rank:05d}.json"
"""Per-rank record of the files a background write finished (removed once COMPLETE is written)."""
RECORD_POLL_SECONDS = 0.05
PLAIN_VALUES = (int, float, complex, str, bytes, bool, type(None), torch.dtype, torch.device, torch.Size)
"""Values a snapshot keeps as they are: training cannot change them in place."""
HOST_MEMORY_SHARE = 0.8
"""A host copy may take this fraction of MemAvailable, split between the host's ranks; a file whose copy
would not fit is written before `save` returns (training waits for that file only)."""


class _HashingFile:
    """A write-only file that hashes and counts what torch.save writes through it."""

    def __init__(self, handle):
        self.handle, self.sha256, self.bytes = handle, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha256.update(data)
        written = self.handle.write(data)
        self.bytes += written
        return written

    def flush(self) -> None:
        self.handle.flush()


def write_hashed(obj: Any, path: Path, zipfile_serialization: bool) -> dict[str, Any]:
    """torch.saves `obj` to `path`, fsynced; returns {"bytes", "sha256"} of what was written."""
    with open(path, "wb") as handle:
        hashed = _HashingFile(handle)
        torch.save(obj, hashed, _use_new_zipfile_serialization=zipfile_serialization)
        handle.flush()
        os.fsync(handle.fileno())
    return {"bytes": hashed.bytes, "sha256": hashed.sha256.hexdigest()}


class BackgroundCheckpointEngine(CheckpointEngine):
    """DeepSpeed checkpoint engine whose `save` only takes a host copy; `BackgroundWrite` writes it."""

    def __init__(self, zipfile_serialization: bool = True):
        super().__init__()
        self.name = "lmforge.BackgroundCheckpointEngine"
        self.zipfile_serialization = zipfile_serialization
        self.pending: list[tuple[Any, Path, dict[str, Any] | None]] = []
        """(host copy, path, None), or (None, path, {"bytes", "sha256"}) for a file already written."""
        self.in_flight: BackgroundWrite | None = None
        self._buffers: dict[tuple[str, int], torch.Tensor] = {}
        self._noted = False

    def create(self, info: CheckpointCommitInfo) -> None:
        assert self.in_flight is None or self.in_flight.done(), "a save started before the previous write was waited for"

    def save(self, state_dict, path: str) -> None:
        name, needed, available = Path(path).name, self._new_host_bytes(state_dict, Path(path).name), _host_bytes_available()
        if available is not None and needed > available:
            if not self._noted:
                print(f"note: {path}: written before training goes on (its host copy needs {needed / 1e9:.1f} GB, "
                      f"{available / 1e9:.1f} GB of host memory is this rank's share of what is available)", flush=True)
                self._noted = True
            self.pending.append((None, Path(path), write_hashed(state_dict, Path(path), self.zipfile_serialization)))
            return
        self.pending.append((self.snapshot(state_dict, name), Path(path), None))

    def load(self, path: str, map_location=None):
        # DeepSpeed's own reader of its files (they hold more than tensors): the same as without this engine
        return TorchCheckpointEngine.load(self, path, map_location=map_location)

    def commit(self, info: CheckpointCommitInfo) -> bool:
        return True  # the COMPLETE record is lmforge's commit, written by the main rank's BackgroundWrite

    def preserves_storage_sharing(self) -> bool:
        return False  # the snapshot copies each tensor alone: DeepSpeed need not clone views first

    def snapshot(self, obj: Any, name: str) -> Any:
        """`obj` with every tensor replaced by a host copy (same dtype and shape; one copy per tensor
        object) and every other object but plain values deep-copied (DeepSpeed's LossScaler changes its
        scale in place)."""
        copies: dict[int, torch.Tensor] = {}
        on_gpu = [False]

        def copy_of(value: Any) -> Any:
            if torch.is_tensor(value):
                if id(value) not in copies:
                    copies[id(value)] = self._host_copy(value.detach(), (name, len(copies)))
                    on_gpu[0] |= value.device.type == "cuda"
                return copies[id(value)]
            if isinstance(value, dict):
                copied = type(value)()
                copied.update((k, copy_of(v)) for k, v in value.items())
                if hasattr(value, "_metadata"):  # a module state dict's versions, read by load_state_dict
                    copied._metadata = value._metadata
                return copied
            if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
                return type(value)(copy_of(v) for v in value)
            return value if isinstance(value, PLAIN_VALUES) else copy.deepcopy(value)

        result = copy_of(obj)
        if on_gpu[0]:
            torch.cuda.synchronize()  # the non-blocking device-to-host copies have landed
        return result

    def _new_host_bytes(self, obj: Any, name: str) -> int:
        """Host bytes `snapshot(obj, name)` would allocate (torch rounds pinned blocks up to a power of two)."""
        seen: dict[int, None] = {}
        needed = 0

        def visit(value: Any) -> None:
            nonlocal needed
            if torch.is_tensor(value):
                if id(value) not in seen:
                    buffer = self._buffers.get((name, len(seen)))
                    seen[id(value)] = None
                    if buffer is None or buffer.shape != value.shape or buffer.dtype != value.dtype:
                        size = value.numel() * value.element_size()
                        needed += 1 << max(size - 1, 0).bit_length() if value.device.type == "cuda" else size
            elif isinstance(value, dict):
                for item in value.values():
                    visit(item)
            elif isinstance(value, (list, tuple)):
                for item in value:
                    visit(item)

        visit(obj)
        return needed

    def _host_copy(self, tensor: torch.Tensor, key: tuple[str, int]) -> torch.Tensor:
        buffer = self._buffers.get(key)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            pin = tensor.device.type == "cuda"
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=pin)
            self._buffers[key] = buffer
        buffer.copy_(tensor, non_blocking=tensor.device.type == "cuda")
        return buffer

    def take_pending(self) -> list[tuple[Any, Path, dict[str, Any] | None]]:
        pending, self.pending = self.pending, []
        return pending


def _host_bytes_available() -> int | None:
    """This rank's share of HOST_MEMORY_SHARE of MemAvailable (None where /proc/meminfo is missing)."""
    try:
        with open("/proc/meminfo") as handle:
            kib = next(int(line.split()[1]) for line in handle if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    local_ranks = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or "1"  # torchrun's, DeepSpeed's launcher's
    return int(kib * 1024 * HOST_MEMORY_SHARE) // max(1, int(local_ranks))


def install(engine) -> BackgroundCheckpointEngine:
    """Makes `engine` save through a BackgroundCheckpointEngine (once); returns it."""
    if not isinstance(engine.checkpoint_engine, BackgroundCheckpointEngine):
        serialization = engine._config.checkpoint_config.get("checkpoint_serialization", True)
        engine.checkpoint_engine = BackgroundCheckpointEngine(bool(serialization))
    return engine.checkpoint_engine


class BackgroundWrite:
    """One rank's part of one checkpoint, written by a daemon thread.

    `commit(files)` (main rank only) runs once every rank's record is on disk, with every file's
    {"bytes", "sha256"}; it writes COMPLETE and `latest`. `abort()` (main rank only) runs instead if
    any rank failed: it removes the partial folder. `before_record(folder)` runs after this
    rank's files are written (fault injection). `wait_own_files()` returns this rank's error (or
    None) once its files and record are written; `give_up()` stops the main rank waiting for the
    records of ranks that failed; `wait()` joins the thread and returns the first error, or None.
    """

    def __init__(self, folder: Path, files: list[tuple[Any, Path, dict[str, Any] | None]], rank: int, world_size: int, zipfile_serialization: bool,
                 commit: Callable[[dict[str, dict[str, Any]]], None] | None, abort: Callable[[], None] | None,
                 before_record: Callable[[Path], None], blocked_seconds: float):
        self.folder, self.files, self.rank, self.world_size = Path(folder), files, rank, world_size
        self.zipfile_serialization, self.commit, self.abort, self.before_record = zipfile_serialization, commit, abort, before_record
        self.blocked_seconds = blocked_seconds
        self.write_seconds: float | None = None
        self.error: str | None = None
        self._own_files_written = threading.Event()
        self._give_up = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"checkpoint-writer-{self.folder.name}", daemon=True)
        self._thread.start()

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait_own_files(self) -> str | None:
        self._own_files_written.wait()
        return self.error

    def give_up(self) -> None:
        self._give_up.set()

    def wait(self, timeout: float | None = None) -> str | None:
        self._thread.join(timeout)
        return self.error

    def _run(self) -> None:
        started = time.perf_counter()
        try:
            written = {}
            for obj, path, entry in self.files:
                written[path.name] = entry or write_hashed(obj, path, self.zipfile_serialization)
            self.files = []  # the host copies stay in the engine's buffers for the next save
            self.before_record(self.folder)
            self._write_record({"files": written})
        except BaseException as err:  # reported at the next wait, on every rank
            self.error = f"rank {self.rank}: {_describe(err)}"
            self._try_write_record({"error": self.error})
        self._own_files_written.set()
        if self.commit is not None:
            self._commit_when_all_ranks_wrote()
            if self.error is not None and self.abort is not None:
                self.abort()
        self.write_seconds = time.perf_counter() - started

    def _write_record(self, record: dict[str, Any]) -> None:
        write_atomic(self.folder / WRITTEN_RECORD.format(rank=self.rank), json.dumps(record).encode())

    def _try_write_record(self, record: dict[str, Any]) -> None:
        try:
            self._write_record(record)
        except OSError:
            pass  # the main rank will not find it: the folder stays incomplete and the error is reported here

    def _commit_when_all_ranks_wrote(self) -> None:
        records = [self.folder / WRITTEN_RECORD.format(rank=r) for r in range(self.world_size)]
        while not all(path.is_file() for path in records):
            if self.error or self._give_up.is_set():
                self.error = self.error or "another rank could not write its files"
                return
            time.sleep(RECORD_POLL_SECONDS)
        files: dict[str, dict[str, Any]] = {}
        try:
            for path in records:
                record = json.loads(path.read_text())
                if "error" in record:
                    self.error = self.error or record["error"]
                files.update(record.get("files", {}))
            if self.error is None:
                self.commit(dict(sorted(files.items())))
                for path in records:
                    path.unlink(missing_ok=True)
        except BaseException as err:
            self.error = self.error or f"rank {self.rank}: {_describe(err)}"


def _describe(err: BaseException) -> str:
    if isinstance(err, OSError):
        where = f": {err.filename}" if err.filename else ""
        return f"{err.strerror or err}{where}"
    if isinstance(err, RuntimeError):
        return str(err).strip().splitlines()[-1][:200] if str(err).strip() else type(err).__name__
    return "".join(traceback.format_exception_only(type(err), err)).strip()[:300]
