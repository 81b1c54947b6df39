"""Atomic writes and checksums: a file either has its final content or does not exist.

`write_atomic` is the one way this code base writes a file that must never be seen half-written
(configs, checkpoint records, manifests, metrics rewrites, tokenizer copies, plots, eval results):
a hidden temp sibling, fsync, then a rename over the target. `atomic_write_bytes`/`atomic_write_json`
are the same with a user-facing one-line error instead of OSError.
"""
from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Union

from lmforge.errors import LmforgeError
from lmforge.out_of_space import describe as describe_space, is_out_of_space
from lmforge.run_layout import OWNER_FILE

_CHUNK = 1 << 20


def temp_path_for(path: Path) -> Path:
    """A hidden sibling name for `path` that `clean_temp_files` recognises as ours."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def clean_temp_files(directory: Path) -> None:
    """Removes temp files left by a killed run in `directory`."""
    for stale in directory.glob(".*.tmp-*"):
        stale.unlink(missing_ok=True)


def fsync_replace(temp: Path, path: Path) -> None:
    """Moves a fully written `temp` onto `path` so readers see the old file or the new one."""
    with open(temp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temp, path)


Content = Union[bytes, str, Callable[[Path], None]]


def write_atomic(path: Path, content: Content) -> None:
    """Writes `content` (bytes, UTF-8 text, or a function that writes the file at the path it is given)
    to `path` through a temp sibling, fsync and a rename: readers see the old file or the new one.
    OSError propagates (the temp file is removed)."""
    path = Path(path)
    temp = temp_path_for(path)
    try:
        if callable(content):
            content(temp)
        else:
            with open(temp, "wb") as handle:
                handle.write(content.encode("utf-8") if isinstance(content, str) else content)
        fsync_replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """write_atomic, with a one-line LmforgeError for a path that cannot be written (a full disk:
    the space needed; the partial file removed, complete files kept)."""
    try:
        write_atomic(path, data)
    except OSError as err:
        if is_out_of_space(err):
            raise LmforgeError(f"{path}: {describe_space(path.parent, len(data))}; the partial file was removed, "
                               "complete files are kept: free space and rerun") from None
        raise LmforgeError(f"{path}: cannot write ({err.strerror or err}); choose a writable location") from None


def atomic_write_json(path: Path, data: Any) -> None:
    """Writes `data` as indented, key-ordered JSON (byte-identical for equal data)."""
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8"))


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file's content, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def ensure_writable_dir(directory: Path) -> Path:
    """Creates `directory` if needed and checks a file can be written there; one-line error if not."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except FileExistsError:
        raise LmforgeError(f"{directory}: exists and is not a directory; expected an output directory") from None
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise LmforgeError(f"{directory}: output directory is not writable ({reason})") from None
    return directory


@contextmanager
def output_directory(directory: Path) -> Iterator[Path]:
    """`ensure_writable_dir` for the length of a job, leaving no trace of a refused input.

    A corpus is judged while it streams (a bad document may come late), so the folders the job had
    to create are removed again when it stops on an LmforgeError (a bad input), with whatever the
    job wrote into them: nobody else's files can be there. A KeptOutputError (complete shards on a
    full disk) and any other failure (an interrupt, a crash) keep what was written, so a rerun
    resumes; only folders still empty are removed then."""
    import shutil

    from lmforge.errors import KeptOutputError, LmforgeError

    directory = Path(directory)
    created = [p for p in (directory, *directory.parents) if not p.exists()]  # deepest first
    ensure_writable_dir(directory)
    try:
        yield directory
    except KeptOutputError:
        raise
    except LmforgeError:
        if created:
            shutil.rmtree(created[-1], ignore_errors=True)
        raise
    except BaseException:
        for folder in created:
            try:
                if [p.name for p in folder.iterdir()] == [OWNER_FILE]:  # the marker alone is not a written output
                    (folder / OWNER_FILE).unlink()
                folder.rmdir()
            except OSError:  # not empty: something was written, keep it
                break
        raise
