"""Activation checkpointing, applied to the plain model from outside (the model file knows nothing of it).

The JSON's `activation_checkpointing` section asks for it; `pretrain.ds_config.activation_checkpoint_every`
says which blocks (every k-th). `checkpoint_function` is the one choice of the recompute function,
for the plain engine (`apply_activation_checkpointing`, called by pretrain.engine.build_engine) and
the pipelined one (pretrain.pipeline hands it to DeepSpeed's PipelineModule): torch's non-reentrant
checkpoint (it composes with torch.compile and ZeRO-3), or DeepSpeed's own when the JSON turns on
`partition_activations` or `cpu_checkpointing`.

A chosen block becomes a `CheckpointedBlock` in place (its class is swapped, as torch's `fully_shard`
does): a wrapper module would prefix every parameter name (`blocks.0.<wrapper>.attn...`), and
DeepSpeed's checkpoints, zero_to_fp32 and the HF export all read those names. Swapping the class
keeps the parameters, their names and the state_dict exactly the plain model's.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.utils.checkpoint

from pretrain.ds_config import activation_checkpoint_every
from pretrain.model import Block


def checkpoint_function(ds_config: dict[str, Any]) -> Callable:
    """fn(function, *args) that runs `function(*args)` and recomputes it in backward instead of keeping activations."""
    section = ds_config.get("activation_checkpointing") or {}
    if section.get("partition_activations") or section.get("cpu_checkpointing"):
        import deepspeed

        deepspeed.checkpointing.configure(None, deepspeed_config=ds_config)
        return deepspeed.checkpointing.checkpoint
    return partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)


class CheckpointedBlock(Block):
    """A Block whose training forward is recomputed in backward (`recompute` is set by apply_activation_checkpointing)."""

    recompute: Callable

    def forward(self, x, rope, cache=None, mask=None) -> torch.Tensor:
        if self.training and cache is None:
            return self.recompute(super().forward, x, rope, None, mask)
        return super().forward(x, rope, cache, mask)


def apply_activation_checkpointing(model: nn.Module, ds_config: dict[str, Any]) -> int:
    """Makes every k-th Block of `model` (a Transformer, or any module holding one) a CheckpointedBlock,
    or every block a plain Block again when the JSON has no activation_checkpointing section.
    Returns how many blocks are checkpointed."""
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    every = activation_checkpoint_every(ds_config, len(blocks)) if blocks else None
    recompute = checkpoint_function(ds_config) if every is not None else None
    chosen = 0
    for i, block in enumerate(blocks):
        if recompute is not None and i % every == 0:
            block.__class__ = CheckpointedBlock
            block.recompute = recompute
            chosen += 1
        elif isinstance(block, CheckpointedBlock):
            block.__class__ = Block
            del block.recompute
    return chosen
