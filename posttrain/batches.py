"""Rendered examples to tensors, and which examples each rank reads at each step.

The k-th example of the global stream is `order[k % n]` of a seeded permutation drawn anew for each
epoch `k // n`; optimizer step s, micro-batch m, rank r of R reads the `micro` examples from
`s * global_batch + m * R * micro + r * micro`, as pretraining does (pretrain/rank_batches.py). So
the global batch does not depend on the number of ranks, and a resumed run continues exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Sequence, TypeVar

import numpy as np
import torch

from posttrain.template import Rendered

IGNORE_INDEX = -100
T = TypeVar("T")


class ExampleOrder(Generic[T]):
    """A reshuffled-every-epoch infinite stream over `items`."""

    def __init__(self, items: Sequence[T], seed: int):
        assert items, "no examples"
        self.items, self.seed = items, seed
        self._epoch, self._perm = -1, np.arange(0)

    def __getitem__(self, k: int) -> T:
        epoch, index = divmod(k, len(self.items))
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.items))
        return self.items[int(self._perm[index])]

    def micro_batch(self, step: int, micro: int, micro_size: int, accum: int, rank: int, world: int) -> list[T]:
        first = step * micro_size * accum * world + micro * world * micro_size + rank * micro_size
        return [self[first + i] for i in range(micro_size)]


@dataclass(frozen=True)
class EvalChunk(Generic[T]):
    items: list[T]
    weights: list[float]
    """1 for a real example, 0 for filler that keeps every rank's forward count equal (ZeRO-3 gathers)."""


def eval_chunks(items: Sequence[T], micro_size: int, rank: int, world: int) -> list[EvalChunk[T]]:
    """This rank's share of `items` in micro-batches, the same number of batches on every rank."""
    mine = list(items[rank::world])
    per_rank = -(-len(items) // world)
    batches = max(1, -(-per_rank // micro_size))
    chunks = []
    for b in range(batches):
        real = mine[b * micro_size : (b + 1) * micro_size]
        filler = [items[0]] * (micro_size - len(real))
        chunks.append(EvalChunk(real + filler, [1.0] * len(real) + [0.0] * len(filler)))
    return chunks


def pad_rows(rows: Sequence[Sequence[int]], value: int, length: int | None = None) -> torch.Tensor:
    """Right-pads lists of ids to one length (the longest, or `length`) -> LongTensor [B, L]."""
    width = length if length is not None else max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(list(row)[:width], dtype=torch.long)
    return out


def masked_targets(next_ids: torch.Tensor, learned: torch.Tensor) -> torch.Tensor:
    """Next-token ids where they are learned, IGNORE_INDEX elsewhere (prompt, padding)."""
    return next_ids.masked_fill(~learned, IGNORE_INDEX)


def lm_inputs_and_targets(rows: Sequence[Rendered], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """inputs [B, L-1] and targets [B, L-1]: the next id where it is learned, else IGNORE_INDEX."""
    ids = pad_rows([r.ids for r in rows], pad_id)
    learned = pad_rows([[int(x) for x in r.learned] for r in rows], 0).bool()
    return ids[:, :-1], masked_targets(ids[:, 1:], learned[:, 1:])


def pack(rows: Sequence[Rendered], seq_len: int) -> list[Rendered]:
    """Greedy packing in order: each row takes whole examples while they fit in seq_len ids.

    Each packed row keeps its examples' boundaries (Rendered.segments): the model attends only
    within an example and restarts its positions there, so packing changes speed, not what is learned.
    """
    packed: list[Rendered] = []
    ids: list[int] = []
    learned: list[bool] = []
    segments: list[int] = []
    for row in rows:
        if ids and len(ids) + len(row) > seq_len:
            packed.append(Rendered(ids, learned, segments))
            ids, learned, segments = [], [], []
        n = len(row.ids[:seq_len])
        ids, learned = ids + row.ids[:seq_len], learned + row.learned[:seq_len]
        segments = segments + [(segments[-1] + 1) if segments else 1] * n
    if ids:
        packed.append(Rendered(ids, learned, segments))
    return packed


def segment_inputs(rows: Sequence[Rendered]) -> torch.Tensor | None:
    """segment_ids [B, L-1] for the inputs of packed rows (padding is segment 0), None when no row is packed."""
    if all(r.segments is None for r in rows):
        return None
    return pad_rows([r.segments if r.segments is not None else [1] * len(r.ids) for r in rows], 0)[:, :-1]


@dataclass(frozen=True)
class PairBatch:
    """Chosen rows then rejected rows, right-padded: tokens [2B, L], lengths [2B], learned [2B, L]."""

    tokens: torch.Tensor
    lengths: torch.Tensor
    learned: torch.Tensor

    @property
    def pairs(self) -> int:
        return self.tokens.shape[0] // 2

    def to(self, device: torch.device) -> "PairBatch":
        return PairBatch(self.tokens.to(device), self.lengths.to(device), self.learned.to(device))


def pair_batch(pairs: Sequence[tuple[Rendered, Rendered]], pad_id: int) -> PairBatch:
    rows = [c for c, _ in pairs] + [r for _, r in pairs]
    return PairBatch(
        tokens=pad_rows([r.ids for r in rows], pad_id),
        lengths=torch.tensor([len(r) for r in rows], dtype=torch.long),
        learned=pad_rows([[int(x) for x in r.learned] for r in rows], 0).bool(),
    )
