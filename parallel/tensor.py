"""Tensor parallelism through DeepSpeed's AutoTP training support, applied from outside the model.

`parallel.tensor` = N > 1 fills DeepSpeed's JSON with `"tensor_parallel": {"autotp_size": N,
"partition_config": ...}` (`with_tensor_parallel`, the one place it is written); `deepspeed.initialize`
then replaces each attention and MLP linear layer of the plain model with DeepSpeed's
column-parallel `LinearLayer` (q/k/v, up/gate: each rank holds 1/N of the output rows, so 1/N of
the heads) or row-parallel `LinearAllreduce` (o_proj, down_proj: 1/N of the input columns, the
partial outputs summed over the tensor group). Embeddings, norms and the head stay whole on every
rank. The layer names are lmforge's (Llama naming), given to AutoTP as explicit layer specs.

Ranks are laid out as DeepSpeed's (data, tensor) mesh: the N ranks of one tensor group are
consecutive global ranks, and they share one data-parallel rank, so they read the same batch
(pretrain.engine.data_parallel_position). `shard_layout` says how a full weight is cut, which is
also how a checkpoint's per-rank files are put back together (`merge_tensor_shards`).
"""
from __future__ import annotations

import copy
import re
from typing import Any

import torch

COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "up_proj", "gate_proj")
"""Linear layers split along their output features (weight rows, and bias)."""
ROW_PARALLEL = ("o_proj", "down_proj")
"""Linear layers split along their input features (weight columns; the bias is whole, added once)."""


def autotp_layer_specs() -> list[dict[str, Any]]:
    """DeepSpeed AutoTP `partition_config.layer_specs` for lmforge's layer names."""
    return [
        {"patterns": [rf".*\.({'|'.join(ROW_PARALLEL)})\.weight$"], "partition_type": "row"},
        {"patterns": [rf".*\.({'|'.join(COLUMN_PARALLEL)})\.weight$"], "partition_type": "column"},
    ]


def tensor_parallel_size_of(ds_config: dict[str, Any]) -> int:
    """N from DeepSpeed's `tensor_parallel.autotp_size` (absent or 0: no tensor parallelism, 1)."""
    return max(1, int((ds_config.get("tensor_parallel") or {}).get("autotp_size", 0) or 0))


def tensor_parallel_json_problems(ds_config: dict[str, Any], tensor: int, source: str = "deepspeed.config") -> list[str]:
    """A JSON `tensor_parallel` section that disagrees with parallel.tensor, one line each."""
    section = ds_config.get("tensor_parallel") or {}
    current = section.get("autotp_size", "auto")
    if current not in ("auto", None, 0, tensor) and not (tensor == 1 and current in (0, 1)):
        return [f"{source}: tensor_parallel.autotp_size = {current!r} contradicts parallel.tensor = {tensor}; "
                "remove it from the JSON or make them agree"]
    return []


def with_tensor_parallel(ds_config: dict[str, Any], tensor: int) -> dict[str, Any]:
    """DeepSpeed's JSON with its `tensor_parallel` section filled from parallel.tensor (a copy;
    unchanged for tensor = 1). `tensor_parallel_json_problems` must have found nothing."""
    if tensor <= 1:
        return ds_config
    config = copy.deepcopy(ds_config)
    section = config.setdefault("tensor_parallel", {})
    section["autotp_size"] = tensor
    section.setdefault("partition_config", {"use_default_specs": False, "layer_specs": autotp_layer_specs()})
    return config


def tensor_parallel_groups(ds_config: dict[str, Any]):
    """DeepSpeed's process-group registry (`deepspeed.utils.groups`) with its (data, tensor) mesh
    made, to pass as `deepspeed.initialize(mpu=...)`; None without tensor parallelism.

    Made before `initialize` so DeepSpeed's batch-size check counts data-parallel ranks
    (world / N), not the world; the engine then reuses the same mesh for AutoTP."""
    size = tensor_parallel_size_of(ds_config)
    if size <= 1:
        return None
    from deepspeed.utils import groups

    groups._init_tp_mesh_device(tensor_model_parallel_size=size)
    return groups


def shard_layout(name: str) -> int | None:
    """The dimension along which parameter `name` is split over the tensor group, or None (whole)."""
    match = re.search(r"\.(\w+)\.(weight|bias)$", name)
    if match is None:
        return None
    layer, kind = match.groups()
    if layer in COLUMN_PARALLEL:
        return 0
    if layer in ROW_PARALLEL and kind == "weight":
        return 1
    return None


def merge_tensor_shards(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One plain state dict from the per-rank module states of a tensor group (in tensor rank order):
    split parameters concatenated along their `shard_layout` dimension, the others taken from rank 0."""
    if len(shards) == 1:
        return dict(shards[0])
    merged = {}
    for name, first in shards[0].items():
        dim = shard_layout(name) if torch.is_tensor(first) else None
        merged[name] = first if dim is None else torch.cat([shard[name] for shard in shards], dim=dim)
    return merged
