"""Reading a run directory: its resolved config and its tokenizer (weights: pretrain.eval_checkpoint)."""
from __future__ import annotations

from pathlib import Path

from lmforge.config import config_from_mapping, read_yaml_mapping
from lmforge.errors import LmforgeError
from pretrain.config import PretrainConfig, resolve_repo_path


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
