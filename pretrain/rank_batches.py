"""Which samples each rank reads at each step.

The global order is a function of (seed, step) only: the k-th sample of optimizer step s is sample
`s * global_batch + k` of the packed (blended) dataset, and rank r of R reads, for micro-batch m,
the slice starting at `m * R * micro + r * micro`. So the same global batch gives the same samples
whatever the number of ranks or the accumulation split, and a resumed run continues exactly.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from lmforge.errors import LmforgeError
from pretrain.config import DataConfig, TrainConfig, resolve_repo_path


def _manifest_tokenizer(shard_dir: Path) -> dict:
    manifest = shard_dir / "manifest.json"
    if not manifest.is_file():
        raise LmforgeError(
            f"data.path = {shard_dir}: no manifest.json there; make the shards with "
            f"`lmforge prep shards --input ... --tokenizer ... --output {shard_dir}`"
        )
    try:
        return json.loads(manifest.read_text())["tokenizer"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise LmforgeError(f"{manifest}: not an lmforge shard manifest (re-run `lmforge prep shards`)") from None


def check_data(data: DataConfig) -> int:
    """Checks every shard directory exists with one tokenizer; returns that tokenizer's vocab size."""
    tokenizers = {}
    for path in data.path:
        shard_dir = resolve_repo_path(path)
        tokenizers[shard_dir] = _manifest_tokenizer(shard_dir)
    fingerprints = {t.get("fingerprint") for t in tokenizers.values()}
    if len(fingerprints) > 1:
        listing = ", ".join(f"{p} ({t.get('fingerprint', '?')[:12]})" for p, t in tokenizers.items())
        raise LmforgeError(f"data.path: shard sets were made with different tokenizers: {listing}")
    return int(next(iter(tokenizers.values()))["vocab_size"])


class TrainingData:
    """The train and valid datasets, and the batch each rank reads."""

    def __init__(self, data: DataConfig, seq_len: int, seed: int, rank: int, world_size: int):
        from pretrain.dataset import build_dataset

        paths = [resolve_repo_path(p) for p in data.path]
        self.rank, self.world_size = rank, world_size
        self.train = build_dataset(paths, data.weights, "train", seq_len, seed)
        try:
            self.valid = build_dataset(paths, data.weights, "valid", seq_len, seed)
        except LmforgeError:
            self.valid = None  # a corpus too small for a valid split: training runs, eval is skipped
        self.has_valid = self.valid is not None

    def _batch(self, dataset, first: int, count: int) -> torch.Tensor:
        rows = [dataset.sample(first + k) for k in range(count)]
        return torch.from_numpy(np.stack(rows).astype(np.int64, copy=False))

    def train_batch(self, step: int, micro: int, train: TrainConfig) -> torch.Tensor:
        mb = train.micro_batch_size
        global_batch = mb * train.grad_accum_steps * self.world_size
        first = step * global_batch + micro * self.world_size * mb + self.rank * mb
        return self._batch(self.train, first, mb)

    def valid_batch(self, index: int, train: TrainConfig) -> torch.Tensor:
        mb = train.micro_batch_size
        return self._batch(self.valid, index * self.world_size * mb + self.rank * mb, mb)
