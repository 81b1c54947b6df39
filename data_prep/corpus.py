"""Streaming corpus readers: paths in, documents (str) out, one at a time.

Memory stays flat in corpus size: files are listed up front (paths only) and read one by one;
record files (.jsonl, .jsonl.gz, .jsonl.zst, .parquet) are streamed line by line or row group by
row group. Every other file is one document. The input name `stdlib` means every `.py` file of
the running Python's standard library, one document per file.
"""
from __future__ import annotations

import fnmatch
import functools
import gzip
import hashlib
import io
import json
import os
import stat
import sys
import sysconfig
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence

from lmforge.errors import LmforgeError

STDLIB = "stdlib"
RECORD_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
_SKIP_HINT = "pass --skip-bad-documents to skip such documents"


@dataclass(frozen=True)
class CorpusSpec:
    """Where documents come from and how they are read."""

    inputs: tuple[str, ...]
    """Files, directories (read recursively) or the name `stdlib`."""
    include: tuple[str, ...] = ()
    """Glob patterns a file found in a directory must match (name or relative path); empty: all."""
    text_field: str = "text"
    """The field holding the text in .jsonl / .parquet records."""
    skip_bad_documents: bool = False
    """Skip (and count) undecodable or malformed documents instead of stopping with an error."""


def describe_inputs(inputs: Sequence[str]) -> str:
    """The inputs for an error message: all of them if few, else the first ones and a count."""
    shown = ", ".join(inputs[:3])
    return shown if len(inputs) <= 3 else f"{shown} and {len(inputs) - 3} more inputs"


def stdlib_root() -> Path:
    """The running Python's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


@functools.lru_cache(maxsize=1)
def _stdlib_files() -> tuple[Path, ...]:
    root = stdlib_root()
    found = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in ("site-packages", "dist-packages")]
        found += [Path(directory) / n for n in names if n.endswith(".py")]
    return tuple(sorted(found, key=lambda p: p.relative_to(root).as_posix()))


def stdlib_files() -> list[Path]:
    """Every .py file of the standard library (not site-/dist-packages), in sorted path order."""
    return list(_stdlib_files())  # listed once per process: the standard library does not change


def _matches(relative: str, patterns: Sequence[str]) -> bool:
    name = relative.rsplit("/", 1)[-1]
    return not patterns or any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(relative, p) for p in patterns)


def special_file_kind(path: Path) -> str | None:
    """None for a regular file (or a link to one); else what it is: reading a FIFO or a device could block forever."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "dangling symlink" if path.is_symlink() else "missing file"
    except OSError as err:
        return f"unreadable ({err.strerror})"
    for test, kind in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket")):
        if test(mode):
            return kind
    return None if stat.S_ISREG(mode) else "not a regular file"


def _directory_files(root: Path, patterns: Sequence[str], skipped: Counter) -> list[Path]:
    """Regular files under `root` matching `patterns`; FIFOs, devices, sockets and dangling links are counted in `skipped`."""
    found = []
    for directory, subdirs, names in os.walk(root):
        for name in names:
            path = Path(directory) / name
            if not _matches(path.relative_to(root).as_posix(), patterns):
                continue
            kind = special_file_kind(path)
            if kind is None:
                found.append(path)
            else:
                skipped[kind] += 1
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def corpus_inputs(spec: CorpusSpec) -> dict[str, list[Path]]:
    """The --input paths (not 'stdlib'), for lmforge.ownership's check that an output does not overlap them."""
    return {"--input": [Path(name) for name in spec.inputs if name != STDLIB]}


def list_files(spec: CorpusSpec, skipped: Counter | None = None) -> list[Path]:
    """The source files of `spec`, in reading order; a missing input is a one-line error.

    Inside a directory, what is not a regular file (FIFO, device, socket, dangling symlink) is
    skipped and counted in `skipped` by kind; named as an input, it is an error."""
    files: list[Path] = []
    skipped = Counter() if skipped is None else skipped
    for name in spec.inputs:
        if name == STDLIB:
            files += stdlib_files()
            continue
        path = Path(name)
        if path.is_dir():
            files += _directory_files(path, spec.include, skipped)
            continue
        kind = special_file_kind(path)
        if kind is None:
            files.append(path)
        elif kind == "missing file":
            raise LmforgeError(f"{path}: input not found; expected a file, a directory or '{STDLIB}'")
        else:
            raise LmforgeError(f"{path}: a {kind}, not a regular file; expected a file, a directory or '{STDLIB}'")
    return files


def describe_skipped_files(skipped: Counter) -> str:
    """e.g. '2 FIFO, 1 dangling symlink' ('' when nothing was skipped)."""
    return ", ".join(f"{count} {kind}" for kind, count in sorted(skipped.items()))


def _is_text_type(arrow_type) -> bool:
    import pyarrow as pa

    return any(check(arrow_type) for check in (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary,
                                               pa.types.is_large_binary)) or str(arrow_type) == "string_view"


def _has_suffix(path: Path, suffix: str) -> bool:
    return path.name.lower().endswith(suffix)


class Corpus:
    """The documents of a `CorpusSpec`, streamed; counts what it skipped in `skipped_documents`."""

    def __init__(self, spec: CorpusSpec) -> None:
        self.spec = spec
        self.skipped_files: Counter = Counter()
        """Entries of input directories that are no files to read (FIFO, device, socket, dangling symlink), by kind."""
        self.files = list_files(spec, self.skipped_files)
        if self.skipped_files:  # never a document, never read (a FIFO would block): said once, not an error
            print(f"note: skipped {describe_skipped_files(self.skipped_files)} in the input directories "
                  "(not regular files)", file=sys.stderr)
        self.skipped_documents = 0
        self._stdlib = set(stdlib_files()) if STDLIB in spec.inputs else set()

    def source_key(self) -> str:
        """sha256 of every source file's path, size and mtime: changes when the corpus may have."""
        digest = hashlib.sha256()
        for path in self.files:
            stat = path.stat()
            digest.update(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()

    def documents(self) -> Iterator[str]:
        """Yields every non-empty document; raises LmforgeError if there is none at all."""
        self.skipped_documents = 0
        count = 0
        for path in self.files:
            for text in self._read_file(path):
                if text:
                    count += 1
                    yield text
        if count == 0:
            what = describe_inputs(self.spec.inputs)
            include = f" matching {', '.join(self.spec.include)}" if self.spec.include else ""
            skipped = f" ({self.skipped_documents} skipped as bad)" if self.skipped_documents else ""
            raise LmforgeError(f"{what}: empty corpus, no non-empty documents{include}{skipped}; expected text files or records")

    def _bad(self, message: str, always_skip: bool = False) -> None:
        if self.spec.skip_bad_documents or always_skip:
            self.skipped_documents += 1
            return
        raise LmforgeError(f"{message}; {_SKIP_HINT}")

    def _read_file(self, path: Path) -> Iterator[str]:
        try:
            if _has_suffix(path, ".parquet"):
                yield from self._read_parquet(path)
            elif _has_suffix(path, ".jsonl.gz"):
                with gzip.open(path, "rb") as stream:
                    yield from self._read_jsonl(path, stream)
            elif _has_suffix(path, ".jsonl.zst"):
                import zstandard

                with open(path, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as reader:
                    yield from self._read_jsonl(path, io.BufferedReader(reader))
            elif _has_suffix(path, ".jsonl"):
                with open(path, "rb") as stream:
                    yield from self._read_jsonl(path, stream)
            else:
                yield from self._read_text(path)
        except (OSError, EOFError) as err:
            raise LmforgeError(f"{path}: cannot read ({err}); expected a readable, uncorrupted file") from None
        except LmforgeError:
            raise
        except Exception as err:  # zstd / arrow decoding errors have library-specific types
            if type(err).__module__.split(".")[0] in ("zstandard", "pyarrow", "_zstd"):
                raise LmforgeError(f"{path}: cannot read ({err}); expected a valid {path.suffix} file") from None
            raise

    def _read_text(self, path: Path) -> Iterator[str]:
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            # CPython ships a few deliberately non-UTF-8 test files; the stdlib corpus skips them.
            self._bad(f"{path}: byte {err.start}: not valid UTF-8 ({err.reason})", path in self._stdlib)
            return
        del data  # a huge document is held once (as text), not twice, while it is tokenized
        yield text

    def _read_jsonl(self, path: Path, stream: BinaryIO) -> Iterator[str]:
        field = self.spec.text_field
        offset = 0
        for number, line in enumerate(stream, start=1):
            start, offset = offset, offset + len(line)
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as err:
                self._bad(f"{path}: byte {start + err.start} (line {number}): not valid UTF-8 ({err.reason})")
                continue
            except json.JSONDecodeError as err:
                self._bad(f"{path}: line {number}: not valid JSON ({err.msg})")
                continue
            text = record.get(field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                what = ("not a JSON object" if not isinstance(record, dict) else f"no field '{field}'" if field not in record
                        else f"'{field}' is null" if text is None else f"'{field}' is {type(text).__name__}")
                self._bad(f"{path}: line {number}: {what}, not a string; set --text-field to the field holding the text")
                continue
            yield text

    def _read_parquet(self, path: Path) -> Iterator[str]:
        import pyarrow.parquet as pq

        table = pq.ParquetFile(path)
        field = self.spec.text_field
        if field not in table.schema_arrow.names:
            raise LmforgeError(
                f"{path}: no column '{field}' (columns: {', '.join(table.schema_arrow.names)}); set --text-field"
            )
        column_type = table.schema_arrow.field(field).type
        if not _is_text_type(column_type):
            raise LmforgeError(f"{path}: column '{field}' holds {column_type}, not text (string or binary); "
                               "set --text-field to the column holding the text")
        row = 0
        for group in range(table.num_row_groups):
            column = table.read_row_group(group, columns=[field]).column(0)
            for value in column.to_pylist():
                row += 1
                if value is None:  # the same rule as a JSONL record without the field: bad, unless skipped
                    self._bad(f"{path}: row {row}: '{field}' is null, not a string")
                    continue
                if isinstance(value, bytes):
                    try:
                        value = value.decode("utf-8")
                    except UnicodeDecodeError as err:
                        self._bad(f"{path}: row {row} byte {err.start}: not valid UTF-8 ({err.reason})")
                        continue
                if isinstance(value, str):
                    yield value
