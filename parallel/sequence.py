"""DeepSpeed-Ulysses sequence parallelism, applied to a plain model from outside it.

Each sequence of T tokens is split over P = `parallel.sequence` ranks: every rank embeds, normalises,
runs the MLPs and the loss on its T/P tokens; in attention DeepSpeed's `DistributedAttention`
exchanges q, k, v (all-to-all) so that each rank attends over the whole sequence for H/P of the
heads, then exchanges the result back. Ranks = data × sequence: ranks d·P … d·P+P-1 form sequence
group d and read the same sequences (their data-parallel rank is d); ZeRO shards and reduces
gradients over all ranks (DeepSpeed's "sequence data parallel" group, asked through the `mpu`).

`apply_sequence_parallel(model, P)` swaps each attention module's `core` and adds two hooks to the
model: one hands it this rank's slice of the (tokens, targets) it is called with, at the slice's
global positions; one turns the slice's mean loss into the whole sequence's (equal slices, no
ignored targets: pretraining). Weights and their names are untouched, so a checkpoint of an SP run
loads as a plain one.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def sequence_parallel_problems(parallel, zero_stage: int, ds_json: str) -> list[str]:
    """What sequence parallelism cannot run with yet, one line each (nothing for parallel.sequence = 1).

    ZeRO-3 under an mpu partitions the weights over the data-parallel group but reduces gradients over
    data × sequence (DeepSpeed 0.19.8): measured wrong gradients, so it is refused. The shape checks
    (P divides train.seq_len and the kv heads) are parallel/degrees.py's.
    """
    if parallel.sequence <= 1:
        return []
    found = []
    if zero_stage >= 3:
        found.append(f"parallel.sequence = {parallel.sequence}: needs ZeRO stage 0, 1 or 2, but {ds_json} has "
                     f"zero_optimization.stage = {zero_stage}; use ds_configs/zero2.json or set parallel.sequence = 1")
    if parallel.pipeline_stages > 1:
        found.append(f"parallel.sequence = {parallel.sequence}: cannot be combined with parallel.pipeline_stages = "
                     f"{parallel.pipeline_stages} yet; set one of them to 1")
    return found


class UlyssesGroups:
    """The process groups DeepSpeed asks its `mpu` for under Ulysses (deepspeed/utils/groups.py).

    Sequence groups are runs of P consecutive ranks; data groups take one rank of each; ZeRO's
    "sequence data parallel" group is the whole world; the model-parallel group is each rank alone
    (there is no tensor parallelism here, so gradient-norm sums over it change nothing).
    Every rank must build it at the same point (group creation is collective).
    """

    def __init__(self, sequence_size: int):
        world, rank = dist.get_world_size(), dist.get_rank()
        if sequence_size < 1 or world % sequence_size:
            raise ValueError(f"sequence-parallel degree {sequence_size} does not divide the world size {world}")
        self.sequence_size = sequence_size
        for first in range(0, world, sequence_size):
            group = dist.new_group(list(range(first, first + sequence_size)))
            if first <= rank < first + sequence_size:
                self._sequence = group
        for offset in range(sequence_size):
            group = dist.new_group(list(range(offset, world, sequence_size)))
            if rank % sequence_size == offset:
                self._data = group
        for alone in range(world):
            group = dist.new_group([alone])
            if alone == rank:
                self._model = group
        self._sequence_data = dist.new_group(list(range(world)))

    def get_sequence_parallel_group(self):
        return self._sequence

    def get_sequence_parallel_world_size(self) -> int:
        return self.sequence_size

    def get_sequence_parallel_rank(self) -> int:
        return dist.get_rank(group=self._sequence)

    def get_data_parallel_group(self):
        return self._data

    def get_data_parallel_world_size(self) -> int:
        return dist.get_world_size(group=self._data)

    def get_data_parallel_rank(self) -> int:
        return dist.get_rank(group=self._data)

    def get_sequence_data_parallel_group(self):
        return self._sequence_data

    def get_sequence_data_parallel_world_size(self) -> int:
        return dist.get_world_size(group=self._sequence_data)

    def get_sequence_data_parallel_rank(self) -> int:
        return dist.get_rank(group=self._sequence_data)

    def get_model_parallel_group(self):
        return self._model

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0


class _HeadsSecond(nn.Module):
    """DistributedAttention hands its local attention [B, T, heads, D]; the model's core takes [B, heads, T, D]."""

    def __init__(self, core: nn.Module):
        super().__init__()
        self.core = core

    def forward(self, q, k, v, dropout_p: float) -> torch.Tensor:
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        # After the exchange every rank holds the whole sequence: attention is causal over all of it.
        return self.core(q, k, v, None, q.shape[2] > 1, dropout_p).transpose(1, 2)


class UlyssesAttentionCore(nn.Module):
    """The model's attention core over the whole sequence for this rank's share of the heads.

    In: q, k, v [B, heads, T/P, D] of this rank's slice; out: [B, heads, T/P, D]. Needs the kv
    heads divisible by P (each rank keeps whole GQA groups). No mask, no KV cache: training only.
    """

    def __init__(self, core: nn.Module, group):
        super().__init__()
        from deepspeed.sequence.layer import DistributedAttention

        self.exchange = DistributedAttention(_HeadsSecond(core), group, scatter_idx=2, gather_idx=1)

    def forward(self, q, k, v, mask: torch.Tensor | None, is_causal: bool, dropout_p: float) -> torch.Tensor:
        if mask is not None:
            raise NotImplementedError("sequence parallelism runs causal attention only (no attention_mask/segment_ids)")
        y = self.exchange(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0, None, dropout_p)
        return y.transpose(1, 2)


class _MeanOverGroup(torch.autograd.Function):
    """Forward: the mean of each rank's value over the group. Backward: each rank's own share (grad / P);
    DeepSpeed then sums gradients over the sequence ranks (and averages over data ranks)."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, group) -> torch.Tensor:
        ctx.size = dist.get_world_size(group=group)
        total = value.detach().clone()
        dist.all_reduce(total, group=group)
        return total / ctx.size

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad / ctx.size, None


def sequence_slice(batch: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """Columns rank·T/P … (rank+1)·T/P of a [B, T] batch."""
    length = batch.shape[1]
    if length % size:
        raise ValueError(f"sequence length {length} is not divisible by the sequence-parallel degree {size}")
    part = length // size
    return batch[:, rank * part : (rank + 1) * part]


def apply_sequence_parallel(model: nn.Module, sequence_size: int) -> UlyssesGroups:
    """Makes `model` (pretrain.model.Transformer, called as model(tokens[B, T], targets[B, T])) run
    Ulysses over groups of `sequence_size` ranks; returns the groups, DeepSpeed's `mpu`. The shapes
    (P divides train.seq_len, the heads and the kv heads) are checked at launch by
    parallel.degrees.degree_problems."""
    groups = UlyssesGroups(sequence_size)
    group = groups.get_sequence_parallel_group()
    rank = groups.get_sequence_parallel_rank()
    swapped = 0
    for module in list(model.modules()):  # listed first: the swap adds modules
        core = getattr(module, "core", None)
        if isinstance(core, nn.Module) and not isinstance(module, _HeadsSecond) and not isinstance(core, UlyssesAttentionCore):
            module.core = UlyssesAttentionCore(core, group)
            swapped += 1
    if not swapped:
        raise ValueError("the model has no attention module with a swappable `core`")

    def take_slice(_module, args: tuple, kwargs: dict[str, Any]):
        tokens, *rest = args
        local = sequence_slice(tokens, rank, sequence_size)
        rest = [sequence_slice(t, rank, sequence_size) if torch.is_tensor(t) and t.dim() == 2 else t for t in rest]
        if torch.is_tensor(kwargs.get("targets")):
            kwargs = {**kwargs, "targets": sequence_slice(kwargs["targets"], rank, sequence_size)}
        return (local, *rest), {**kwargs, "position_offset": rank * local.shape[1]}

    def whole_sequence_loss(_module, _args, _kwargs, output):
        if torch.is_tensor(output) and output.dim() == 0:  # the mean loss (with targets); logits stay local
            return _MeanOverGroup.apply(output, group)
        return output

    model.register_forward_pre_hook(take_slice, with_kwargs=True)
    model.register_forward_hook(whole_sequence_loss, with_kwargs=True)
    return groups
