"""Reads an expert-parallel checkpoint (parallel.expert > 1) back as the plain model's weights.

DeepSpeed saves an MoE model's dense weights (and each block's router, `...mlp.moe.deepspeed_moe.gate.wg.weight`)
in `mp_rank_00_model_states.pt` and every expert alone in `layer_<moe block>_expert_<global id>_mp_rank_00_model_states.pt`
(keys `...mlp.moe.deepspeed_moe.experts.deepspeed_experts.<global id>.<proj>.weight`). DeepSpeed's
zero_to_fp32 refuses these folders, so the module states are read directly: fp32 when training ran
in fp32 or autocast (the shipped JSONs); under DeepSpeed's bf16/fp16 mode they are the 16-bit module
weights (upcast), not the optimizer's fp32 masters. Keys are renamed to pretrain/model.py's MoEMLP:
`...mlp.router.weight` and `...mlp.experts.<id>.<proj>.weight`.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from lmforge.errors import LmforgeError

EXPERT_FILE = re.compile(r"layer_(\d+)_expert_(\d+)_mp_rank_00_model_states\.pt")
_GATE = ".mlp.moe.deepspeed_moe.gate.wg."
_EXPERTS = ".mlp.moe.deepspeed_moe.experts.deepspeed_experts."


def is_expert_parallel_checkpoint(folder: Path) -> bool:
    return any(EXPERT_FILE.fullmatch(p.name) for p in Path(folder).glob("layer_*_expert_*_mp_rank_00_model_states.pt"))


def _load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: pickle, zip and key errors alike
        raise LmforgeError(f"{path}: unreadable DeepSpeed model states ({type(err).__name__}: {err})") from None


def plain_name(key: str) -> str:
    """A DeepSpeed MoE layer's parameter name as the plain MoEMLP's (other names unchanged)."""
    return key.replace(_GATE, ".mlp.router.").replace(_EXPERTS, ".mlp.experts.")


def expert_parallel_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """fp32 plain-model weights of an expert-parallel checkpoint folder (see the module docstring)."""
    folder = Path(folder)
    module_path = folder / "mp_rank_00_model_states.pt"
    if not module_path.is_file():
        raise LmforgeError(f"{module_path}: missing; the checkpoint is incomplete (retrain, or pick another --step)")
    states = _load(module_path)
    state = {plain_name(k): v.float() for k, v in states["module"].items()}
    for path in sorted(folder.glob("layer_*_expert_*_mp_rank_00_model_states.pt")):
        if EXPERT_FILE.fullmatch(path.name):
            state.update({plain_name(k): v.float() for k, v in _load(path).items()})
    return state
