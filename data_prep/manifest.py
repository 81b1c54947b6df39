"""DIR/manifest.json: what a shard directory holds, and the check that it is intact.

Training calls `load_manifest` and `verify_manifest` before it starts; `lmforge prep verify` runs
the same check from the command line. The JSON layout is documented in docs/formats.md.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from data_prep.indexed_dataset import bin_path, idx_path
from lmforge.errors import LmforgeError
from lmforge.files import sha256_file

MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1
Split = Literal["train", "valid"]
SPLITS: tuple[Split, ...] = ("train", "valid")
_REGENERATE = "regenerate the directory with `lmforge prep shards`"


@dataclass(frozen=True)
class Shard:
    """One Megatron .bin/.idx pair of a split."""

    path: str
    """Prefix relative to the manifest's directory, e.g. 'train_00000' (files: .bin and .idx)."""
    split: Split
    documents: int
    tokens: int
    """Tokens in .bin, one EOD per document included."""
    bytes: int
    """UTF-8 bytes of the source text of these documents (for bits per byte)."""
    bin_sha256: str
    idx_sha256: str
    bin_size: int
    idx_size: int


@dataclass(frozen=True)
class TokenizerRef:
    """The tokenizer the shards were made with; a copy sits in the shard directory."""

    path: Path
    """Absolute path of the tokenizer.model given to `prep shards`."""
    fingerprint: str
    """sha256 of tokenizer.model."""
    vocab_size: int
    eod_id: int
    bos_id: int
    pad_id: int


@dataclass(frozen=True)
class Manifest:
    """A complete shard directory."""

    directory: Path
    format_version: int
    tokenizer: TokenizerRef
    shards: tuple[Shard, ...]
    inputs: tuple[str, ...]
    options: dict[str, Any]
    corpus: dict[str, Any]

    @property
    def tokenizer_copy(self) -> Path:
        """DIR/tokenizer.model, the copy that travels with the shards."""
        return self.directory / "tokenizer.model"

    def split_shards(self, split: Split) -> tuple[Shard, ...]:
        return tuple(s for s in self.shards if s.split == split)

    def tokens(self, split: Split) -> int:
        return sum(s.tokens for s in self.split_shards(split))

    def bytes(self, split: Split) -> int:
        return sum(s.bytes for s in self.split_shards(split))


def shard_to_json(shard: Shard) -> dict[str, Any]:
    return {
        "path": shard.path, "split": shard.split, "documents": shard.documents, "tokens": shard.tokens,
        "bytes": shard.bytes, "sha256": {"bin": shard.bin_sha256, "idx": shard.idx_sha256},
        "file_bytes": {"bin": shard.bin_size, "idx": shard.idx_size},
    }


def shard_from_json(data: dict[str, Any]) -> Shard:
    return Shard(
        path=data["path"], split=data["split"], documents=int(data["documents"]), tokens=int(data["tokens"]),
        bytes=int(data["bytes"]), bin_sha256=data["sha256"]["bin"], idx_sha256=data["sha256"]["idx"],
        bin_size=int(data["file_bytes"]["bin"]), idx_size=int(data["file_bytes"]["idx"]),
    )


def manifest_to_json(manifest: Manifest, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    tok = manifest.tokenizer
    return {
        "format_version": manifest.format_version,
        "tokenizer": {
            "path": str(tok.path), "copy": "tokenizer.model", "fingerprint": tok.fingerprint,
            "vocab_size": tok.vocab_size, "eod_id": tok.eod_id, "bos_id": tok.bos_id, "pad_id": tok.pad_id,
        },
        "inputs": list(manifest.inputs),
        "options": manifest.options,
        "corpus": manifest.corpus,
        "shards": [shard_to_json(s) for s in manifest.shards],
        **(extra or {}),
    }


def manifest_from_json(directory: Path, data: dict[str, Any]) -> Manifest:
    tok = data["tokenizer"]
    return Manifest(
        directory=Path(directory),
        format_version=int(data["format_version"]),
        tokenizer=TokenizerRef(
            path=Path(tok["path"]), fingerprint=tok["fingerprint"], vocab_size=int(tok["vocab_size"]),
            eod_id=int(tok["eod_id"]), bos_id=int(tok["bos_id"]), pad_id=int(tok["pad_id"]),
        ),
        shards=tuple(shard_from_json(s) for s in data["shards"]),
        inputs=tuple(data["inputs"]),
        options=dict(data["options"]),
        corpus=dict(data["corpus"]),
    )


def load_manifest(directory: Path | str) -> Manifest:
    """Reads DIR/manifest.json; a missing, malformed or newer-format file is a one-line error."""
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    if not path.is_file():
        hint = "the run did not finish; rerun it" if (directory / "manifest.partial.json").is_file() else _REGENERATE
        raise LmforgeError(f"{path}: manifest not found, so {directory} is not a complete shard directory; {hint}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format_version") != FORMAT_VERSION:
            raise LmforgeError(f"{path}: format_version {data.get('format_version')!r}, expected {FORMAT_VERSION}; {_REGENERATE}")
        return manifest_from_json(directory, data)
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise LmforgeError(f"{path}: not a valid shard manifest ({type(err).__name__}: {err}); {_REGENERATE}") from None


# (path, size, mtime_ns) -> sha256, so a second verify of unchanged files reads nothing.
_verified: dict[tuple[str, int, int], str] = {}


def _check_file(path: Path, size: int, sha256: str) -> None:
    if not path.is_file():
        raise LmforgeError(f"{path}: missing; {_REGENERATE}")
    stat = path.stat()
    if stat.st_size != size:
        raise LmforgeError(f"{path}: {stat.st_size} bytes, manifest says {size}; {_REGENERATE}")
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    actual = _verified.get(key) or sha256_file(path)
    if actual != sha256:
        raise LmforgeError(f"{path}: sha256 {actual[:12]}... does not match the manifest's {sha256[:12]}...; {_REGENERATE}")
    _verified[key] = actual


def verify_manifest(directory: Path | str) -> Manifest:
    """Loads the manifest and checks every file against its size and sha256; raises on the first bad one."""
    manifest = load_manifest(directory)
    copy = manifest.tokenizer_copy
    if not copy.is_file():
        raise LmforgeError(f"{copy}: missing; {_REGENERATE}")
    _check_file(copy, copy.stat().st_size, manifest.tokenizer.fingerprint)
    for shard in manifest.shards:
        prefix = manifest.directory / shard.path
        _check_file(bin_path(prefix), shard.bin_size, shard.bin_sha256)
        _check_file(idx_path(prefix), shard.idx_size, shard.idx_sha256)
    return manifest
