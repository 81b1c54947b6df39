"""Megatron-LM / gpt-neox MMapIndexedDataset files: PREFIX.bin (tokens) and PREFIX.idx (index).

.idx layout, little-endian (see docs/formats.md):
    9 bytes  magic b"MMIDIDX\\x00\\x00"
    uint64   version (1)
    uint8    dtype code of the .bin tokens (Megatron's codes, `DTYPE_CODES`)
    uint64   number of sequences S
    uint64   number of document-index entries D (documents + 1)
    int32[S] sequence lengths in tokens
    int64[S] byte offset of each sequence in .bin
    int64[D] document index: sequence number where each document starts, then S
Here one sequence is one document, so the document index is 0, 1, ..., S.
"""
from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import numpy as np

from lmforge.errors import LmforgeError
from lmforge.files import fsync_replace, temp_path_for

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER = struct.Struct("<9sQBQQ")
DTYPE_CODES: dict[int, type] = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16,
}
_CODE_OF = {np.dtype(t): code for code, t in DTYPE_CODES.items()}


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else int32."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.int32)


def bin_path(prefix: Path) -> Path:
    return Path(f"{prefix}.bin")


def idx_path(prefix: Path) -> Path:
    return Path(f"{prefix}.idx")


def index_bytes(sizes: np.ndarray, dtype: np.dtype) -> bytes:
    """The whole .idx file for documents of `sizes` tokens each, stored as `dtype`."""
    sizes = np.asarray(sizes, dtype=np.int64)
    pointers = np.zeros(len(sizes), dtype=np.int64)
    np.cumsum(sizes[:-1] * np.dtype(dtype).itemsize, out=pointers[1:])
    document_index = np.arange(len(sizes) + 1, dtype=np.int64)
    header = HEADER.pack(MAGIC, VERSION, _CODE_OF[np.dtype(dtype)], len(sizes), len(document_index))
    return b"".join([header, sizes.astype("<i4").tobytes(), pointers.astype("<i8").tobytes(), document_index.astype("<i8").tobytes()])


class IndexedDatasetWriter:
    """Appends documents to PREFIX.bin; `finish` writes PREFIX.idx. Both appear only when complete.

    Tokens go to a temp file; `finish` renames the .bin into place first and the .idx last, so
    a prefix with an .idx always has its full .bin. `abort` removes the temp files.
    """

    def __init__(self, prefix: Path, dtype: np.dtype) -> None:
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        self._bin_temp = temp_path_for(bin_path(self.prefix))
        self._idx_temp = temp_path_for(idx_path(self.prefix))
        self._stream = open(self._bin_temp, "wb")
        self._bin_digest = hashlib.sha256()
        self._sizes: list[int] = []
        self.tokens = 0

    @property
    def documents(self) -> int:
        return len(self._sizes)

    def add_document(self, tokens: np.ndarray) -> None:
        """Appends one document's tokens (EOD included by the caller)."""
        # a view of the tokens' bytes, no copy (a huge document's tokens are hundreds of MB)
        data = memoryview(np.ascontiguousarray(np.asarray(tokens).astype(self.dtype.newbyteorder("<"), copy=False))).cast("B")
        self._stream.write(data)
        self._bin_digest.update(data)
        self._sizes.append(len(tokens))
        self.tokens += len(tokens)

    def finish(self) -> tuple[str, str]:
        """Writes the index, renames both files into place; returns (bin sha256, idx sha256)."""
        self._stream.close()
        index = index_bytes(np.array(self._sizes, dtype=np.int64), self.dtype)
        self._idx_temp.write_bytes(index)
        fsync_replace(self._bin_temp, bin_path(self.prefix))
        fsync_replace(self._idx_temp, idx_path(self.prefix))
        return self._bin_digest.hexdigest(), hashlib.sha256(index).hexdigest()

    def abort(self) -> None:
        self._stream.close()
        self._bin_temp.unlink(missing_ok=True)
        self._idx_temp.unlink(missing_ok=True)


def _bad_index(path: Path, what: str) -> LmforgeError:
    return LmforgeError(f"{path}: {what}; not a Megatron MMIDIDX index, regenerate it with `lmforge prep shards`")


class IndexedDataset:
    """Reads PREFIX.bin/.idx through numpy memmaps: `ds[i]` is document i's tokens."""

    def __init__(self, prefix: Path | str) -> None:
        self.prefix = Path(prefix)
        index_file, data_file = idx_path(self.prefix), bin_path(self.prefix)
        for path in (index_file, data_file):
            if not path.is_file():
                raise LmforgeError(f"{path}: shard file not found; regenerate it with `lmforge prep shards`")
        with open(index_file, "rb") as stream:
            header = stream.read(HEADER.size)
        if len(header) < HEADER.size:
            raise _bad_index(index_file, "file too short for the header")
        magic, version, code, count, doc_count = HEADER.unpack(header)
        if magic != MAGIC or version != VERSION or code not in DTYPE_CODES:
            raise _bad_index(index_file, f"header is magic={magic!r} version={version} dtype code={code}")
        expected = HEADER.size + count * (4 + 8) + doc_count * 8
        if index_file.stat().st_size != expected:
            raise _bad_index(index_file, f"{index_file.stat().st_size} bytes, expected {expected} for {count} sequences")
        self.dtype = np.dtype(DTYPE_CODES[code])
        index = np.memmap(index_file, mode="r", dtype=np.uint8)
        offset = HEADER.size
        self.sizes = np.frombuffer(index, dtype="<i4", count=count, offset=offset)
        self.pointers = np.frombuffer(index, dtype="<i8", count=count, offset=offset + 4 * count)
        self.document_index = np.frombuffer(index, dtype="<i8", count=doc_count, offset=offset + 12 * count)
        self.num_tokens = int(self.sizes.sum(dtype=np.int64))
        bin_size = data_file.stat().st_size
        if bin_size != self.num_tokens * self.dtype.itemsize:
            raise LmforgeError(
                f"{data_file}: {bin_size} bytes, but its index lists {self.num_tokens} tokens of {self.dtype}; "
                "regenerate it with `lmforge prep shards`"
            )
        self.tokens = (
            np.memmap(data_file, mode="r", dtype=self.dtype.newbyteorder("<"))
            if bin_size
            else np.zeros(0, dtype=self.dtype)
        )

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"document {i} out of range for {len(self)} documents")
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self.tokens[start : start + int(self.sizes[i])]
