"""Which kind of run a directory holds, and its model with its weights: the readers eval, generate
and export-hf share.

`lmforge train` and `lmforge import-hf` save a PretrainConfig as RUN_DIR/config.yaml;
`lmforge sft|reward|ppo|dpo` a PosttrainConfig (it has an `init` section; `data` names JSONL files,
not shards). The readers both kinds share (model section, tokenizer, weights) are below, in
pretrain.run_dir and pretrain.run_weights; this module needs post-training's config, so it sits above both.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union


from lmforge.config import config_from_mapping
from lmforge.errors import LmforgeError
from lmforge.run_layout import config_path
from posttrain.config import PosttrainConfig
from pretrain.config import PretrainConfig, resolve_repo_path
from pretrain.model import Transformer
from pretrain.run_dir import config_mapping
from pretrain.run_weights import lm_state_dict

AnyRunConfig = Union[PretrainConfig, PosttrainConfig]


def is_posttrain(config: AnyRunConfig) -> bool:
    return isinstance(config, PosttrainConfig)


def load_run_config(run_dir: Path) -> AnyRunConfig:
    """The resolved config a run saved as RUN_DIR/config.yaml: a PretrainConfig, or a PosttrainConfig
    for a post-training run (its mapping has an `init` section)."""
    data, path = config_mapping(run_dir)
    schema = PosttrainConfig if "init" in data else PretrainConfig
    return config_from_mapping(schema, data, str(path))


def training_shards(config: AnyRunConfig) -> tuple[Path, ...]:
    """The shard directories a run trained on (pretraining's data.path); () for a post-training run (JSONL)."""
    return () if is_posttrain(config) else tuple(resolve_repo_path(p) for p in config.data.path)


def load_checked_model(run_dir: Path, step: int | None = None) -> tuple[Transformer, AnyRunConfig, str]:
    """The run's model (CPU, fp32, eval mode) with its checkpoint's weights, and its config and tag.

    Any run: pretraining, import-hf, SFT, DPO, PPO (the actor); the config is a PretrainConfig or a PosttrainConfig.
    """
    config = load_run_config(run_dir)
    if config.model.vocab_size is None:
        raise LmforgeError(f"{config_path(run_dir)}: model.vocab_size is null; a trained run's config names it")
    state, tag = lm_state_dict(run_dir, config.model, step)
    model = Transformer(config.model)
    model.load_state_dict(state)
    return model.eval(), config, tag
