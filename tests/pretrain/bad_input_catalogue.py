"""What the bad-input catalogue is made of: a case (`BadInput`: argv, expected fragments of the one
error line, setup steps) and the helpers that build cases. The cases are in
tests/pretrain/test_reliability_bad_inputs.py and its siblings bad_inputs_*.py; the one test that
runs them all is in test_reliability_bad_inputs.py."""
from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lmforge.files import sha256_file

TINY = ["--set", "model.n_layers=2", "--set", "model.d_model=32", "--set", "model.n_heads=4", "--set", "model.n_kv_heads=2",
        "--set", "train.micro_batch_size=2", "--set", "train.seq_len=32", "--set", "train.warmup_steps=1",
        "--set", "run.progress_bar=false", "--set", "run.tensorboard=false"]


def train(ws: Path, *sets: str, run: str = "newrun", data: str = "shards") -> list[str]:
    args = ["train", "--config", "tiny", "--set", f"run.dir={ws / run}", "--set", f"data.path=[{ws / data}]", *TINY]
    for item in sets:
        args += ["--set", item]
    return args


def write(relative: str, content: str | bytes) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        path = ws / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return setup


def flip_byte(relative: str, offset: int = 100) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        path = ws / relative
        data = bytearray(path.read_bytes())
        data[offset] ^= 0xFF
        path.write_bytes(bytes(data))
    return setup


def truncate(relative: str, keep: int = 40) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        path = ws / relative
        path.write_bytes(path.read_bytes()[:keep])
    return setup


def other_tokenizer_shards(ws: Path) -> None:
    shutil.copytree(ws / "shards", ws / "other")
    manifest = json.loads((ws / "other" / "manifest.json").read_text())
    manifest["tokenizer"]["fingerprint"] = "0" * 64
    (ws / "other" / "manifest.json").write_text(json.dumps(manifest))


def idx_says_int32(ws: Path) -> None:
    """train_00000.idx claims int32 tokens for a uint16 .bin; the manifest's checksums are updated to match."""
    idx = ws / "shards" / "train_00000.idx"
    data = bytearray(idx.read_bytes())
    data[struct.calcsize("<9sQ")] = 4  # Megatron's dtype code of int32
    idx.write_bytes(bytes(data))
    manifest = json.loads((ws / "shards" / "manifest.json").read_text())
    for shard in manifest["shards"]:
        if shard["path"] == "train_00000":
            shard["sha256"]["idx"], shard["file_bytes"]["idx"] = sha256_file(idx), idx.stat().st_size
    (ws / "shards" / "manifest.json").write_text(json.dumps(manifest))


@dataclass(frozen=True)
class BadInput:
    name: str
    argv: Callable[[Path], list[str]]
    expected: tuple[str, ...]
    """Fragments of the error line; `{ws}` stands for the workspace."""
    setup: tuple[Callable[[Path], None], ...] = field(default=())
    marks: tuple = ()
