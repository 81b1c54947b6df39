"""Frozen models for post-training (DPO's reference; PPO's reference and reward model): a plain module
in the training precision, or a DeepSpeed ZeRO-3 inference engine whose weights are partitioned
over the ranks like the trained ones (DeepSpeed-Chat's choice for models too big to replicate).

Trained models (policy, critic, reward model) go through pretrain.engine.build_engine unchanged.
"""
from __future__ import annotations

import copy
from typing import Any, Literal

import deepspeed
import torch

from pretrain.ds_config import precision_of, zero_stage_of

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def inference_ds_config(ds_config: dict[str, Any]) -> dict[str, Any]:
    """The training JSON reduced to what a ZeRO-3 forward-only engine needs (no optimizer, no scheduler)."""
    zero = {k: v for k, v in copy.deepcopy(ds_config.get("zero_optimization", {})).items()
            if k not in ("offload_optimizer", "stage")}
    config = {
        "train_micro_batch_size_per_gpu": ds_config["train_micro_batch_size_per_gpu"],
        "gradient_accumulation_steps": ds_config.get("gradient_accumulation_steps", 1),
        "zero_optimization": {"stage": 3, **zero},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    for key in ("bf16", "fp16"):
        if key in ds_config:
            config[key] = copy.deepcopy(ds_config[key])
    return config


def uses_zero3_inference(ds_config: dict[str, Any], mode: Literal["auto", "plain", "zero3"]) -> bool:
    return mode == "zero3" or (mode == "auto" and zero_stage_of(ds_config) == 3)


def build_frozen(model: torch.nn.Module, ds_config: dict[str, Any], mode: Literal["auto", "plain", "zero3"],
                 device: torch.device):
    """An inference-only model (no gradients, eval mode): a ZeRO-3 engine or the plain module on `device`."""
    model.requires_grad_(False)
    model.eval()
    if uses_zero3_inference(ds_config, mode):
        engine, _, _, _ = deepspeed.initialize(model=model, config=inference_ds_config(ds_config))
        engine.eval()
        return engine
    return model.to(device=device, dtype=DTYPES[precision_of(ds_config)])
