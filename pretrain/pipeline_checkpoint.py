"""A pipelined checkpoint's layer files mapped back to the plain Transformer's state dict.

DeepSpeed's PipelineEngine saves module weights per layer, not per rank (docs/pipeline.md):
CHECKPOINT/<tag>/layer_XX-model_states.pt holds the state dict of layer XX of
`pretrain.pipeline.pipeline_layers` (written by data-parallel rank 0 of the stage owning it; a
tied head has no file of its own, its weight is layer 00's embedding). The wrappers keep the
Transformer's attribute names, so the mapping is by index only: `block.<name>` of layer
FIRST_BLOCK_LAYER + i is `blocks.<i>.<name>`; every other key is already the model's.

The weights are the module's: fp32 for fp32 or torch_autocast training (the shipped JSONs).
Under DeepSpeed's bf16/fp16 mode they are the 16-bit copies (the fp32 masters stay in the ZeRO
optimizer shards), returned upcast to fp32.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from lmforge.errors import LmforgeError
from pretrain.pipeline import FIRST_BLOCK_LAYER

LAYER_FILE = re.compile(r"layer_(\d+)-model_states\.pt")


def layer_files(folder: Path) -> dict[int, Path]:
    """{layer index: file} of a checkpoint folder (empty for a checkpoint that is not pipelined)."""
    found = {}
    for path in Path(folder).glob("layer_*-model_states.pt"):
        match = LAYER_FILE.fullmatch(path.name)
        if match:
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def is_pipeline_checkpoint(folder: Path) -> bool:
    return bool(layer_files(folder))


def model_name(layer: int, key: str) -> str:
    """The Transformer's name for `key` of layer file `layer`."""
    if key.startswith("block."):
        return f"blocks.{layer - FIRST_BLOCK_LAYER}.{key.removeprefix('block.')}"
    return key


def pipeline_state_dict_to_model(folder: Path) -> dict[str, torch.Tensor]:
    """fp32 state dict of pretrain.model.Transformer from the layer files in `folder` (one checkpoint tag).

    A tied model gets `lm_head.weight` as its embedding, as Transformer.state_dict() has it.
    """
    files = layer_files(folder)
    if not files:
        raise LmforgeError(f"{folder}: no layer_XX-model_states.pt files; not a pipelined checkpoint")
    missing = [i for i in range(max(files)) if i not in files]
    if missing:
        raise LmforgeError(f"{folder}: layer file(s) {', '.join(f'layer_{i:02d}' for i in missing)} missing; "
                           "the checkpoint is incomplete (pick another step)")
    state: dict[str, torch.Tensor] = {}
    for layer, path in files.items():
        try:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # a truncated or foreign file: pickle, zip and key errors alike
            raise LmforgeError(f"{path}: unreadable layer weights ({type(err).__name__}: {err})") from None
        for key, value in tensors.items():
            state[model_name(layer, key)] = value.float()
    if "embed.weight" in state and "lm_head.weight" not in state:
        state["lm_head.weight"] = state["embed.weight"]
    return state
