"""The training side of the shards: packed fixed-length windows, shuffled by pure functions of an index.

`PackedDataset` joins a split's documents (EOD tokens included) across shards into one token stream
and cuts it into windows of `seq_len + 1` tokens every `seq_len` tokens, across document
boundaries, as GPT pretraining does. `sample(i)` is defined for every i >= 0: epoch i // num_windows,
position i % num_windows through a seeded permutation of that epoch. The permutation is a Feistel
network (with cycle walking), so a sample costs a few hashes and one read: no per-epoch index to
build or store, and a resumed run or any rank reads index `step * global_batch + k` directly.
`samples(first, count)` reads a batch of rows for a fraction of the Python time (the batch thread
holds the GIL that much less): table lookups instead of hashes, one slice copy a row.
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from data_prep.indexed_dataset import IndexedDataset
from data_prep.manifest import Manifest, load_manifest, verify_manifest
from lmforge.errors import LmforgeError

_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64's finalizer: a cheap, well-spread 64-bit hash."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _mix64_array(x: np.ndarray) -> np.ndarray:
    """`_mix64` of each element of a uint64 array (numpy's uint64 multiply wraps modulo 2**64)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _key(*parts: int) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


class FeistelPermutation:
    """A seeded bijection of range(n): `perm(i)` for i < n, in O(1) time and memory (`many`: O(sqrt(n)))."""

    ROUNDS = 4
    TABLE_HALF_BITS = 16
    """`many` tabulates the rounds up to this many bits a half (4 tables of 2**16 uint32, 1 MiB)."""

    def __init__(self, n: int, key: int) -> None:
        if n < 1:
            raise ValueError("permutation of an empty range")
        bits = max(2, (n - 1).bit_length())
        self.n, self._half = n, (bits + 1) // 2
        self._mask = (1 << self._half) - 1
        self._keys = [_mix64(key ^ _mix64(r + 1)) for r in range(self.ROUNDS)]
        self._tables: tuple[memoryview, ...] | None = None

    def _round_trip(self, x: int) -> int:
        left, right = x >> self._half, x & self._mask
        for k in self._keys:
            left, right = right, left ^ (_mix64(right ^ k) & self._mask)
        return (left << self._half) | right

    def __call__(self, i: int) -> int:
        x = self._round_trip(i)
        while x >= self.n:  # cycle walking: stay inside range(n), still a bijection
            x = self._round_trip(x)
        return x

    def many(self, positions: Iterable[int]) -> list[int]:
        """`perm(i)` for each i of `positions` (all < n): the values of `__call__`, 6-9x faster.

        Each round's function of the right half is tabulated once, by numpy over all 2**half
        values, so a round costs one lookup instead of a 64-bit hash in Python ints. Cycle walking
        stays per element: numpy over a batch would wait on its longest walk at ~40 calls a trip.
        """
        if self._half > self.TABLE_HALF_BITS:
            return [self(i) for i in positions]
        if self._tables is None:
            right = np.arange(1 << self._half, dtype=np.uint64)
            self._tables = tuple(
                memoryview((_mix64_array(right ^ np.uint64(k)) & np.uint64(self._mask)).astype(np.uint32))
                for k in self._keys
            )
        half, mask, n, tables = self._half, self._mask, self.n, self._tables
        out = []
        for x in positions:
            while True:  # one round trip, then again while outside range(n), as __call__
                left, right = x >> half, x & mask
                for table in tables:
                    left, right = right, left ^ table[right]
                x = (left << half) | right
                if x < n:
                    break
            out.append(x)
        return out


class PackedDataset:
    """Windows of `seq_len + 1` tokens of one split of a shard directory; `sample(i)` for any i >= 0."""

    def __init__(self, shard_dir: Path, split: str, seq_len: int, seed: int, manifest: Manifest | None = None) -> None:
        self.manifest = manifest or load_manifest(shard_dir)
        self.shard_dir, self.split, self.seq_len, self.seed = Path(shard_dir), split, int(seq_len), int(seed)
        if self.seq_len < 1:
            raise LmforgeError(f"seq_len = {seq_len}: expected a positive integer")
        shards = self.manifest.split_shards(split)  # type: ignore[arg-type]
        if not shards:
            raise LmforgeError(
                f"{self.shard_dir}: no '{split}' shards; rerun `lmforge prep shards` (with --valid-fraction > 0 for 'valid')"
            )
        # plain ndarray views of the memmaps: slicing an np.memmap costs ~1 us more, per row read
        self._parts = [np.asarray(IndexedDataset(self.shard_dir / s.path).tokens) for s in shards]
        self._starts = np.cumsum([0] + [len(p) for p in self._parts])
        self.num_tokens = int(self._starts[-1])
        self.num_windows = (self.num_tokens - 1) // self.seq_len
        if self.num_windows < 1:
            raise LmforgeError(
                f"{self.shard_dir}: '{split}' holds {self.num_tokens} tokens, fewer than seq_len + 1 = {self.seq_len + 1}; "
                "lower seq_len or add data"
            )
        self._permutations: dict[int, FeistelPermutation] = {}

    def __getstate__(self) -> dict:
        # Pickle the recipe, not the memmaps (which would pickle as full copies of the data).
        return {"shard_dir": self.shard_dir, "split": self.split, "seq_len": self.seq_len, "seed": self.seed,
                "manifest": self.manifest}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)  # type: ignore[misc]

    @property
    def vocab_size(self) -> int:
        return self.manifest.tokenizer.vocab_size

    @property
    def eod_id(self) -> int:
        return self.manifest.tokenizer.eod_id

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.manifest.tokenizer.fingerprint

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the split's stream, as int64."""
        out = np.empty(stop - start, dtype=np.int64)
        part = int(np.searchsorted(self._starts, start, side="right")) - 1
        filled = 0
        while filled < len(out):
            offset = start + filled - int(self._starts[part])
            piece = self._parts[part][offset : offset + len(out) - filled]
            out[filled : filled + len(piece)] = piece
            filled += len(piece)
            part += 1
        return out

    def window(self, w: int) -> np.ndarray:
        """Unshuffled window w: tokens [w * seq_len, w * seq_len + seq_len + 1)."""
        if not 0 <= w < self.num_windows:
            raise IndexError(f"window {w} out of range for {self.num_windows} windows")
        return self.tokens(w * self.seq_len, (w + 1) * self.seq_len + 1)

    def window_index(self, i: int) -> int:
        """Which window sample i reads: a pure function of (seed, i // num_windows, i)."""
        if i < 0:
            raise IndexError(f"sample index {i} must be >= 0")
        epoch, position = divmod(int(i), self.num_windows)
        return self._permutation(epoch)(position)

    def _permutation(self, epoch: int) -> FeistelPermutation:
        permutation = self._permutations.get(epoch)
        if permutation is None:
            if len(self._permutations) > 8:
                self._permutations.clear()
            permutation = self._permutations[epoch] = FeistelPermutation(self.num_windows, _key(self.seed, epoch))
        return permutation

    def window_indices(self, first: int, count: int) -> np.ndarray:
        """`window_index(first + k)` for k in range(count), as int64; the rows may span several epochs."""
        if first < 0:
            raise IndexError(f"sample index {first} must be >= 0")
        out = np.empty(count, dtype=np.int64)
        done = 0
        while done < count:  # one run of consecutive positions per epoch
            epoch, position = divmod(int(first) + done, self.num_windows)
            take = min(count - done, self.num_windows - position)
            out[done : done + take] = self._permutation(epoch).many(range(position, position + take))
            done += take
        return out

    def sample(self, i: int) -> np.ndarray:
        """seq_len + 1 tokens (int64): inputs are [:-1], targets [1:]."""
        return self.window(self.window_index(i))

    def samples(self, first: int, count: int) -> np.ndarray:
        """[count, seq_len + 1] int64: row k is `sample(first + k)`, in a fraction of the time.

        Each row is one slice copy from its shard part (found for all rows by one searchsorted);
        the few windows that span two parts are read by `tokens`. Copying slices beats one fancy
        index per part: that costs ~30 us a part, and a batch's rows fall in many parts.
        """
        width = self.seq_len + 1
        starts = self.window_indices(first, count) * self.seq_len
        parts = np.searchsorted(self._starts, starts, side="right") - 1
        offsets = starts - self._starts[parts]
        out = np.empty((count, width), dtype=np.int64)
        for k, (start, part, offset) in enumerate(zip(starts.tolist(), parts.tolist(), offsets.tolist())):
            piece = self._parts[part][offset : offset + width]
            out[k] = piece if len(piece) == width else self.tokens(start, start + width)
        return out

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, i: int) -> np.ndarray:
        return self.sample(i)


def _block_counts(weights: np.ndarray, block: int) -> np.ndarray:
    """Integer counts summing to `block`, proportional to `weights` (largest remainder)."""
    exact = weights * block
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: block - int(counts.sum())]] += 1
    return counts


class BlendedDataset:
    """Draws from several datasets in proportion to `weights`; `sample(i)` is a pure function of (seed, i).

    Indices are cut into blocks; each block holds every dataset its exact share of times (largest
    remainder), in a seeded random order, so the mix is exact per block and sample(i) only needs its
    own block. Dataset d's k-th draw overall reads d.sample(k).
    """

    def __init__(self, datasets: Sequence[PackedDataset], weights: Sequence[float], seed: int) -> None:
        if not datasets or len(datasets) != len(weights):
            raise LmforgeError(f"{len(datasets)} datasets but {len(weights)} weights: expected one weight per dataset")
        raw = np.array(weights, dtype=np.float64)
        if not np.all(np.isfinite(raw)) or np.any(raw < 0) or raw.sum() <= 0:
            raise LmforgeError(f"weights {list(weights)}: expected non-negative numbers with a positive sum")
        if len({d.seq_len for d in datasets}) > 1:
            raise LmforgeError(f"datasets have seq_len {[d.seq_len for d in datasets]}: expected one seq_len")
        self.datasets, self.seed = list(datasets), int(seed)
        self.weights = raw / raw.sum()
        smallest = self.weights[self.weights > 0].min()
        self.block = int(min(max(4096, math.ceil(16 / smallest)), 1 << 22))
        self._counts = _block_counts(self.weights, self.block)
        self._pattern = np.repeat(np.arange(len(datasets)), self._counts)
        self._blocks: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.seq_len = datasets[0].seq_len
        self.num_windows = sum(d.num_windows for d in datasets)

    @property
    def vocab_size(self) -> int:
        return self.datasets[0].vocab_size

    @property
    def eod_id(self) -> int:
        return self.datasets[0].eod_id

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        cached = self._blocks.get(b)
        if cached is None:
            choice = np.random.default_rng([self.seed, b]).permutation(self._pattern)
            rank = np.empty(self.block, dtype=np.int64)
            for d in range(len(self.datasets)):
                where = np.flatnonzero(choice == d)
                rank[where] = np.arange(len(where))
            if len(self._blocks) > 4:
                self._blocks.clear()
            cached = self._blocks[b] = (choice, rank)
        return cached

    def source(self, i: int) -> tuple[int, int]:
        """(dataset number, index into that dataset) that sample i reads."""
        if i < 0:
            raise IndexError(f"sample index {i} must be >= 0")
        b, j = divmod(int(i), self.block)
        choice, rank = self._block(b)
        d = int(choice[j])
        return d, b * int(self._counts[d]) + int(rank[j])

    def sources(self, first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """`source(first + j)` for j in range(count), as two int64 arrays: dataset numbers, indices."""
        if first < 0:
            raise IndexError(f"sample index {first} must be >= 0")
        dataset, index = np.empty(count, dtype=np.int64), np.empty(count, dtype=np.int64)
        done = 0
        while done < count:  # one run of consecutive positions per block
            b, j = divmod(int(first) + done, self.block)
            take = min(count - done, self.block - j)
            choice, rank = self._block(b)
            dataset[done : done + take] = choice[j : j + take]
            index[done : done + take] = b * self._counts[choice[j : j + take]] + rank[j : j + take]
            done += take
        return dataset, index

    def sample(self, i: int) -> np.ndarray:
        d, k = self.source(i)
        return self.datasets[d].sample(k)

    def samples(self, first: int, count: int) -> np.ndarray:
        """[count, seq_len + 1] int64: row j is `sample(first + j)`, one `samples` call per dataset."""
        dataset, index = self.sources(first, count)
        out = np.empty((count, self.seq_len + 1), dtype=np.int64)
        for d in np.unique(dataset):
            rows = np.flatnonzero(dataset == d)
            # dataset d's draws run 0, 1, 2, ... in index order, across blocks too: one consecutive range
            assert index[rows[-1]] - index[rows[0]] == len(rows) - 1
            out[rows] = self.datasets[d].samples(int(index[rows[0]]), len(rows))
        return out

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, i: int) -> np.ndarray:
        return self.sample(i)


def build_dataset(paths: Sequence[Path], weights: Sequence[float] | None, split: str, seq_len: int, seed: int) -> PackedDataset | BlendedDataset:
    """One dataset over shard directories `paths`, after verifying their checksums and shared tokenizer.

    Without weights, several directories are mixed in proportion to their tokens in `split`.
    """
    if not paths:
        raise LmforgeError("no data paths given: expected at least one shard directory")
    if weights is not None and len(weights) != len(paths):
        raise LmforgeError(f"{len(paths)} data paths but {len(weights)} weights: expected one weight per path")
    manifests = [verify_manifest(p) for p in paths]
    first = manifests[0].tokenizer.fingerprint
    for path, manifest in zip(paths[1:], manifests[1:]):
        if manifest.tokenizer.fingerprint != first:
            raise LmforgeError(
                f"{path}: made with tokenizer {manifest.tokenizer.fingerprint[:12]}..., but {paths[0]} with "
                f"{first[:12]}...; all data paths must share one tokenizer"
            )
    datasets = [
        PackedDataset(Path(p), split, seq_len, _key(seed, k) if len(paths) > 1 else seed, manifest=m)
        for k, (p, m) in enumerate(zip(paths, manifests))
    ]
    if len(datasets) == 1:
        return datasets[0]
    mix = list(weights) if weights is not None else [d.num_tokens for d in datasets]
    return BlendedDataset(datasets, mix, seed)
