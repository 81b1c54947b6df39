"""Recognising a full disk, whatever raised it, and saying so in one line with the space needed.

Python raises OSError(ENOSPC); torch.save raises RuntimeError ("[enforce fail at inline_container.cc]
. unexpected pos 576 vs 534", or "PytorchStreamWriter failed writing file ...: file write failed");
safetensors raises its own SafetensorError ("... No space left on device (os error 28)").
"""
from __future__ import annotations

import errno
import re
import shutil
from pathlib import Path

# torch.save's stream writer on a full disk: "file write failed", or "unexpected pos N vs M" (a short write)
_MESSAGES = re.compile(r"no space left|os error 28|errno 28|file write failed|failed writing file|unexpected pos \d+ vs \d+|"
                       r"disk quota", re.I)


def is_out_of_space(err: BaseException) -> bool:
    """True for an error a full disk (or quota) raises, from Python, torch or safetensors."""
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    return bool(_MESSAGES.search(str(err)))


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def free_bytes(path: Path) -> int:
    """Free space of the filesystem holding `path` (or its nearest existing parent)."""
    path = Path(path)
    for candidate in (path, *path.parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return 0


def describe(path: Path, needed: int | None) -> str:
    """'out of space: about N needed, M free on PATH's filesystem' (N omitted when unknown)."""
    need = f"about {human_bytes(needed)} needed, " if needed else ""
    return f"out of space ({need}{human_bytes(free_bytes(path))} free on the filesystem of {path})"
