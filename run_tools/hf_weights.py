"""Hugging Face weight files: write `model.safetensors` (sharded with an index when large), read them back.

Writing follows transformers' conventions: one `model.safetensors`, or `model-0000k-of-0000n.safetensors`
plus `model.safetensors.index.json` ({"metadata": {"total_size"}, "weight_map"}) when the weights
exceed the shard size; huggingface_hub decides the split. Reading accepts those and the older
`pytorch_model.bin` (single or indexed) that many Hub checkpoints still ship.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from lmforge.errors import LmforgeError

SAFE_SINGLE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_SINGLE, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000 (decimal units, as huggingface_hub counts); a bad size is a one-line error."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B?)\s*", text.upper())
    if not match or float(match.group(1)) <= 0:
        raise LmforgeError(f"--max-shard-size {text!r}: expected a size such as 5GB, 500MB or 200KB")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def save_safetensors(state: dict[str, torch.Tensor], output_dir: Path, max_shard_bytes: int, metadata: dict[str, str]) -> list[str]:
    """Writes the weights into `output_dir`; returns the file names written (index last, if any)."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_bytes)
    written = []
    for filename, names in split.filename_to_tensors.items():
        save_file({name: state[name] for name in names}, str(output_dir / filename), metadata={"format": "pt", **metadata})
        written.append(filename)
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values()), **split.metadata},
                 "weight_map": split.tensor_to_filename}
        (output_dir / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        written.append(SAFE_INDEX)
    return written


def _shard_files(model_dir: Path, index_name: str) -> list[Path]:
    index_path = model_dir / index_name
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise LmforgeError(f"{index_path}: not a readable weight index ({type(err).__name__}: {err})") from None
    files = [model_dir / name for name in dict.fromkeys(weight_map.values())]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise LmforgeError(f"{index_path}: names shard files that are missing: {', '.join(missing[:3])}")
    return files


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors and torch raise several types for a damaged file
        raise LmforgeError(f"{path}: unreadable weight file ({type(err).__name__}: {err})") from None


def load_hf_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF model directory (safetensors preferred, else pytorch_model.bin)."""
    model_dir = Path(model_dir)
    if (model_dir / SAFE_INDEX).is_file():
        files = _shard_files(model_dir, SAFE_INDEX)
    elif (model_dir / SAFE_SINGLE).is_file():
        files = [model_dir / SAFE_SINGLE]
    elif (model_dir / BIN_INDEX).is_file():
        files = _shard_files(model_dir, BIN_INDEX)
    elif (model_dir / BIN_SINGLE).is_file():
        files = [model_dir / BIN_SINGLE]
    else:
        raise LmforgeError(f"{model_dir}: no {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX}; not a transformers model directory")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(_read_file(path))
    return state
