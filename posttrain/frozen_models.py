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

WEIGHT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def weight_dtype(ds_config: dict[str, Any]) -> torch.dtype:
    """The dtype DeepSpeed keeps the model's weights in: bf16/fp16 modes, else fp32 (fp32 and autocast)."""
    return WEIGHT_DTYPES.get(precision_of(ds_config), torch.float32)


def autocast_dtype(ds_config: dict[str, Any]) -> torch.dtype | None:
    """The dtype of DeepSpeed's torch_autocast mode, None when it is off."""
    precision = precision_of(ds_config)
    if not precision.startswith("autocast-"):
        return None
    return {"autocast-bf16": torch.bfloat16, "autocast-fp16": torch.float16}.get(precision, torch.bfloat16)


class Autocast(torch.nn.Module):
    """A frozen plain module run under torch.autocast, as the training engines run under torch_autocast."""

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.module, self.dtype = module, dtype

    def forward(self, *args, **kwargs):
        device_type = next(self.module.parameters()).device.type
        with torch.autocast(device_type=device_type, dtype=self.dtype):
            return self.module(*args, **kwargs)


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
    for key in ("bf16", "fp16", "torch_autocast"):
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
    model = model.to(device=device, dtype=weight_dtype(ds_config))
    cast = autocast_dtype(ds_config)
    return Autocast(model, cast) if cast is not None else model
