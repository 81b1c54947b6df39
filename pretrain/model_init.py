"""The one place a Transformer is constructed for training: under `deepspeed.zero.Init` for ZeRO-3.

At ZeRO-3 each rank then holds only its 1/W partition of the weights from the start (no full fp32
copy on the host: 4 bytes per parameter per rank saved, 27 GiB a rank for a 7B model). zero.Init
partitions each submodule's parameters as its __init__ ends, so the Transformer's own init (which
runs last, over all submodules) would see empty tensors: `build_model` runs it again per module
with the parameters gathered, rank 0's values kept (DeepSpeed's GatheredParameters(modifier_rank=0)).
Call it after torch.distributed is initialised.
"""
from __future__ import annotations

from typing import Any

import deepspeed

from pretrain.ds_config import zero_stage_of
from pretrain.model import ModelConfig, Transformer


def build_model(model_config: ModelConfig, ds_config: dict[str, Any]) -> Transformer:
    """The model for `ds_config`: plain at ZeRO-0/1/2, partitioned as it is built at ZeRO-3 (same init values)."""
    if zero_stage_of(ds_config) != 3:
        return Transformer(model_config)
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = Transformer(model_config)
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if own:
            with deepspeed.zero.GatheredParameters(own, modifier_rank=0):
                model._init_weights(module)
    return model
