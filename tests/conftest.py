"""Shared fixtures: a tiny tokenizer and shard set built once per test session from stdlib files."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from data_prep.corpus import CorpusSpec, stdlib_files
from data_prep.shards import ShardOptions, build_shards
from data_prep.tokenizer import TokenizerOptions, train_tokenizer

TINY_VOCAB_SIZE = 512
TINY_FILES = 40


def _stdlib_subset(n: int) -> list[Path]:
    """The first `n` non-empty, UTF-8 standard library files (sorted path order)."""
    chosen = []
    for path in stdlib_files():
        data = path.read_bytes()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if data:
            chosen.append(path)
        if len(chosen) == n:
            break
    return chosen


@pytest.fixture(scope="session")
def stdlib_subset() -> Callable[[int], list[Path]]:
    """Call with n: the first n non-empty UTF-8 stdlib .py files, as a deterministic small corpus."""
    return _stdlib_subset


@dataclass(frozen=True)
class TinyCorpus:
    """A trained tokenizer and its shards: train in several shards, valid in at least one."""

    files: tuple[Path, ...]
    tokenizer_dir: Path
    shard_dir: Path
    vocab_size: int


@pytest.fixture(scope="session")
def tiny_corpus_shards(tmp_path_factory: pytest.TempPathFactory) -> TinyCorpus:
    """40 stdlib files, a 512-piece BPE tokenizer and Megatron shards (train + valid, ~300k tokens)."""
    root = tmp_path_factory.mktemp("tiny_corpus")
    files = tuple(_stdlib_subset(TINY_FILES))
    spec = CorpusSpec(inputs=tuple(str(p) for p in files))
    train_tokenizer(spec, TokenizerOptions(vocab_size=TINY_VOCAB_SIZE), root / "tokenizer", progress=False)
    # seed 3 puts 4 of the 40 files (~100 kB) in valid, enough for eval tests
    options = ShardOptions(valid_fraction=0.15, seed=3, shard_tokens=100_000, workers=1)
    build_shards(spec, root / "tokenizer" / "tokenizer.model", root / "shards", options, progress=False)
    return TinyCorpus(files=files, tokenizer_dir=root / "tokenizer", shard_dir=root / "shards", vocab_size=TINY_VOCAB_SIZE)


@pytest.fixture(scope="session")
def finished_tiny_run(tiny_corpus_shards, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workspace with `shards/` and `run/`: a 2-step tiny pretraining run (checkpoint step_00000002),
    for tests to copy (tests/lmforge/test_ownership.py, tests/pretrain/test_reliability_data_safety.py)."""
    import shutil

    from tests.pretrain.training_runs import run_training

    ws = tmp_path_factory.mktemp("finished_tiny_run")
    shutil.copytree(tiny_corpus_shards.shard_dir, ws / "shards")
    run_training(ws / "run", ws / "shards", **{"train.max_steps": 2, "train.warmup_steps": 1})
    return ws
