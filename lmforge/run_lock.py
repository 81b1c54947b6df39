"""One live process per run directory: an OS advisory lock on RUN_DIR/.lock.

The main process (rank 0) takes `fcntl.flock(LOCK_EX | LOCK_NB)` on RUN_DIR/.lock and keeps the file
open for its lifetime; the kernel releases the lock when the process ends in any way (exit, crash,
SIGKILL, node reboot of a local disk), so no stale lock is ever left to clean up. The file holds the
holder's pid, host and start time while it is held, which a refused second process names in its one-line
error; a clean exit empties it again. The lock file itself is never deleted (deleting it would let two
processes lock two different files).

flock is per open file: on NFS it is emulated with POSIX locks by Linux (>= 2.6.12), which also
release on death; some old or misconfigured network filesystems ignore locks (docs/reliability.md).
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable

from lmforge.errors import LmforgeError
from lmforge.run_layout import LOCK_FILE

_held: dict[str, int] = {}
"""Lock files this process holds -> their open descriptor (kept open until the process ends)."""


def _holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 4096).decode("utf-8"))
        return f"pid {data['pid']} on {data['host']}, started {data['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not written its details yet"


def acquire(run_dir: Path) -> Path:
    """Locks RUN_DIR/.lock for this process (again: a no-op); LmforgeError naming the holder if another has it."""
    path = Path(run_dir) / LOCK_FILE
    key = os.path.realpath(path)
    if key in _held:
        return path
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as err:
        raise LmforgeError(f"{path}: cannot create the run lock ({err.strerror or err})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise LmforgeError(f"run.dir = {run_dir}: in use by another lmforge process ({holder}); "
                           "wait for it to finish or stop it, or choose another run.dir") from None
    except OSError as err:
        os.close(fd)
        raise LmforgeError(f"{path}: cannot lock the run directory ({err.strerror or err})") from None
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    _held[key] = fd
    return path


def release(run_dir: Path) -> None:
    """Empties and unlocks RUN_DIR/.lock if this process holds it (a killed process's lock the kernel
    releases, its details left in the file until the next holder overwrites them)."""
    _release(os.path.realpath(Path(run_dir) / LOCK_FILE))


def release_all() -> None:
    """Releases every lock this process holds (the entry points' shutdown calls it)."""
    for key in list(_held):
        _release(key)


def _release(key: str) -> None:
    fd = _held.pop(key, None)
    if fd is not None:
        os.ftruncate(fd, 0)  # at rest the file is empty: a finished or refused run leaves it byte-identical
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def acquire_on_main(run_dir: Path, main: bool, share: Callable[[Any], Any]) -> None:
    """The main rank takes the lock; `share` (a broadcast from it) tells every rank, so all refuse together."""
    error = None
    if main:
        try:
            acquire(run_dir)
        except LmforgeError as err:
            error = str(err)
    error = share(error)
    if error:
        raise LmforgeError(error)
