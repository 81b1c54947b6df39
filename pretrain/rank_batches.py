"""Which samples each rank reads at each step.

The global order is a function of (seed, step) only: the k-th sample of optimizer step s is sample
`s * global_batch + k` of the packed (blended) dataset, and rank r of R reads, for micro-batch m,
the slice starting at `m * R * micro + r * micro`. So the same global batch gives the same samples
whatever the number of ranks or the accumulation split, and a resumed run continues exactly.
"""
from __future__ import annotations

import queue
import threading

import torch

from lmforge.errors import LmforgeError
from pretrain.config import DataConfig, TrainConfig, resolve_repo_path


def document_segment_ids(inputs: torch.Tensor, eod_id: int) -> torch.Tensor:
    """[B, T] ids of the document each input token belongs to (data.document_masking): a document ends
    at its EOD token, so the count of EODs strictly before a position. The model keeps attention within
    one id and restarts positions at each new id (pretrain.model.Transformer.hidden_states)."""
    ends = (inputs == eod_id).int()
    return ends.cumsum(dim=1) - ends


class TrainingData:
    """The train and valid datasets, and the batch each rank reads."""

    def __init__(self, data: DataConfig, seq_len: int, seed: int, rank: int, world_size: int):
        from data_prep.packed_dataset import build_dataset

        paths = [resolve_repo_path(p) for p in data.path]
        self.rank, self.world_size = rank, world_size
        self.train = build_dataset(paths, data.weights, "train", seq_len, seed)
        self.document_eod = self.train.eod_id if data.document_masking else None
        """The EOD id that ends documents when data.document_masking is on (None: attend across them)."""
        try:
            self.valid = build_dataset(paths, data.weights, "valid", seq_len, seed)
        except LmforgeError:
            self.valid = None  # a corpus too small for a valid split: training runs, eval is skipped
        self.has_valid = self.valid is not None

    def _batch(self, dataset, first: int, count: int) -> torch.Tensor:
        return torch.from_numpy(dataset.samples(first, count))  # [count, seq_len + 1] int64, no copy

    def train_batch(self, step: int, micro: int, train: TrainConfig) -> torch.Tensor:
        mb = train.micro_batch_size
        global_batch = mb * train.grad_accum_steps * self.world_size
        first = step * global_batch + micro * self.world_size * mb + self.rank * mb
        return self._batch(self.train, first, mb)

    def valid_batch(self, index: int, train: TrainConfig) -> torch.Tensor:
        mb = train.micro_batch_size
        return self._batch(self.valid, index * self.world_size * mb + self.rank * mb, mb)


class BatchPrefetcher:
    """This rank's training batches, built ahead in a background thread in step order.

    The main thread only takes the next one: building (`samples`: memmap reads into one array) and, on a GPU,
    copying into pinned memory happen meanwhile, so the host-to-device copy can be non-blocking.
    The order is the same function of (step, micro-batch) as `TrainingData.train_batch`; an error
    in the thread is raised by `next`.
    """

    def __init__(self, data: TrainingData, train: TrainConfig, first_step: int, pin_memory: bool, depth: int = 3):
        self.data, self.train, self.pin_memory = data, train, pin_memory
        self._queue: queue.Queue = queue.Queue(maxsize=max(2, depth * train.grad_accum_steps))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(first_step,), name="lmforge-batches", daemon=True)
        self._thread.start()

    def _fill(self, step: int) -> None:
        try:
            while not self._stop.is_set():
                for micro in range(self.train.grad_accum_steps):
                    batch = self.data.train_batch(step, micro, self.train)
                    if self.pin_memory:
                        batch = batch.pin_memory()
                    self._put(((step, micro), batch))
                step += 1
        except BaseException as err:  # handed to the main thread
            self._put(((None, None), err))

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def next(self, step: int, micro: int) -> torch.Tensor:
        """The batch of micro-batch `micro` of optimizer step `step` (the next one in order)."""
        where, batch = self._queue.get()
        if isinstance(batch, BaseException):
            raise batch
        assert where == (step, micro), f"prefetched {where}, asked for {(step, micro)}"
        return batch

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
