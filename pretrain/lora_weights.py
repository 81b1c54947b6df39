"""LoRA adapters merged into plain weights: a run trained with `lora` (posttrain/lora.py, through PEFT)
checkpoints PEFT's names (`X.base_layer.weight`, `X.lora_A.default.weight`, `X.lora_B.default.weight`);
every reader of a run's weights (pretrain.run_weights) gets the plain model's names, W + (alpha/rank)·B·A.
"""
from __future__ import annotations

from pathlib import Path

import torch

BASE, LORA_A, LORA_B = ".base_layer.", ".lora_A.default.weight", ".lora_B.default.weight"


def has_lora(state: dict[str, torch.Tensor]) -> bool:
    return any(k.endswith(LORA_A) for k in state)


def lora_scale(run_dir: Path) -> float:
    """alpha / rank from the run's config.yaml `lora` section (the scale PEFT applies to B·A)."""
    from lmforge.config import read_yaml_mapping
    from lmforge.errors import LmforgeError
    from lmforge.run_layout import config_path

    section = read_yaml_mapping(config_path(run_dir)).get("lora") or {}
    rank, alpha = section.get("rank"), section.get("alpha")
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, (int, float)):
        raise LmforgeError(f"{config_path(run_dir)}: its checkpoint holds LoRA adapters but lora.rank/lora.alpha "
                           f"({rank!r}, {alpha!r}) do not say their scale")
    return float(alpha) / rank


def merge_lora(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """The state with each adapted Linear's W + scale·B·A under its plain name (adapters dropped)."""
    merged: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith((LORA_A, LORA_B)):
            continue
        if BASE in key:
            prefix, _, leaf = key.partition(BASE)
            if leaf == "weight":
                delta = state[prefix + LORA_B].float() @ state[prefix + LORA_A].float()
                value = (value.float() + scale * delta).to(value.dtype)
            key = f"{prefix}.{leaf}"
        merged[key] = value
    return merged


def split_lora(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The frozen base weights under their plain names, and the adapters as `PREFIX.lora_A.weight` /
    `PREFIX.lora_B.weight` (PREFIX: the plain Linear's name, e.g. blocks.0.attn.q_proj)."""
    base: dict[str, torch.Tensor] = {}
    adapters: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for peft_leaf, leaf in ((LORA_A, ".lora_A.weight"), (LORA_B, ".lora_B.weight")):
            if key.endswith(peft_leaf):
                adapters[key[: -len(peft_leaf)] + leaf] = value
                break
        else:
            prefix, _, rest = key.partition(BASE)
            base[f"{prefix}.{rest}" if rest else key] = value
    return base, adapters
