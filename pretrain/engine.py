"""Wraps the plain model in a DeepSpeed engine: parameter groups, activation checkpointing, compile."""
from __future__ import annotations

from functools import partial
from typing import Any

import deepspeed
import torch
import torch.utils.checkpoint

from pretrain.ds_config import activation_checkpoint_every
from pretrain.model import Transformer


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay matrices of linear layers; not norms, biases or embeddings."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        if param.dim() >= 2 and id(param) not in embedding_ids:
            decay.append(param)
        else:
            no_decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def configure_activation_checkpointing(model: Transformer, ds_config: dict[str, Any]) -> None:
    """Recompute every k-th block's activations in backward when the JSON asks for it.

    Torch's non-reentrant checkpoint is used (it composes with torch.compile and ZeRO-3); with
    DeepSpeed's `partition_activations` or `cpu_checkpointing` on, DeepSpeed's own checkpoint is.
    """
    every = activation_checkpoint_every(ds_config, model.config.n_layers)
    if every is None:
        model.checkpoint_fn = None
        return
    section = ds_config["activation_checkpointing"]
    if section.get("partition_activations") or section.get("cpu_checkpointing"):
        deepspeed.checkpointing.configure(None, deepspeed_config=ds_config)
        model.checkpoint_fn = deepspeed.checkpointing.checkpoint
    else:
        model.checkpoint_fn = partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    model.checkpoint_every = every


def build_engine(model: Transformer, ds_config: dict[str, Any], weight_decay: float, compile_model: bool):
    """Returns the DeepSpeed engine (optimizer and WarmupCosineLR scheduler from the JSON).

    The model is compiled in place before DeepSpeed wraps it: measured faster than
    `engine.compile()` (docs/performance.md), and parameter names stay unprefixed in checkpoints.
    """
    configure_activation_checkpointing(model, ds_config)
    if compile_model:
        model.compile()
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=parameter_groups(model, weight_decay), config=ds_config
    )
    return engine


def optimizer_step(engine, micro_batches) -> torch.Tensor:
    """Forward/backward over (inputs, targets) micro-batches, then DeepSpeed's step at the boundary.

    Returns the mean loss as a device tensor: nothing here waits for the GPU.
    """
    total, count = None, 0
    for inputs, targets in micro_batches:
        loss = engine(inputs, targets)
        engine.backward(loss)
        engine.step()
        total = loss.detach().float() if total is None else total + loss.detach().float()
        count += 1
    return total / count


@torch.no_grad()
def evaluation_loss(engine, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean loss of one batch without gradients (fp32, on device)."""
    return engine(inputs, targets).detach().float()


def data_parallel_position(engine) -> tuple[int, int]:
    """(rank, size) of this process among the data-parallel replicas: who reads which samples."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return 0, 1
    group = engine.data_parallel_group if hasattr(engine, "data_parallel_group") else None
    return dist.get_rank(group=group), dist.get_world_size(group=group)
