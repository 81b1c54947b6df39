"""Reading a finished (or running) run directory: its resolved config, trained model and tokenizer."""
from __future__ import annotations

from pathlib import Path

import torch

from lmforge.config import config_from_mapping, read_yaml_mapping
from lmforge.errors import LmforgeError
from pretrain import checkpoint
from pretrain.config import PretrainConfig, resolve_repo_path
from pretrain.model import Transformer


def load_run_config(run_dir: Path) -> PretrainConfig:
    """The resolved config a run saved as RUN_DIR/config.yaml."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise LmforgeError(f"{run_dir}: not an lmforge run directory (no config.yaml); train with `lmforge train` first")
    return config_from_mapping(PretrainConfig, read_yaml_mapping(path), str(path))


def tokenizer_model_path(config: PretrainConfig) -> Path:
    """The sentencepiece model the run's data was made with (the copy kept beside the shards)."""
    shard_dir = resolve_repo_path(config.data.path[0])
    path = shard_dir / "tokenizer.model"
    if not path.is_file():
        raise LmforgeError(f"{path}: tokenizer model not found beside the run's shards (data.path)")
    return path


def load_trained_model(run_dir: Path, tag: str | None = None, device: str | torch.device = "cpu") -> tuple[Transformer, PretrainConfig, str]:
    """The run's model with its consolidated fp32 weights (any ZeRO stage), in eval mode."""
    config = load_run_config(run_dir)
    state, tag = checkpoint.consolidated_state_dict(run_dir, tag)
    model = Transformer(config.model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.model.tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise LmforgeError(
            f"{checkpoint.checkpoints_dir(run_dir) / tag}: weights do not match the run's model config "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return model.to(device).eval(), config, tag
