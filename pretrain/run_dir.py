"""Reading a run directory, pretraining's or post-training's: its config, model and tokenizer
(its weights: pretrain.eval_checkpoint).

`lmforge train` and `lmforge import-hf` save a PretrainConfig as RUN_DIR/config.yaml and trained on
shards (`data.path`, each with its tokenizer.model beside it). `lmforge sft|reward|ppo|dpo` save a
PosttrainConfig (it has an `init` section; `data` names JSONL files, not shards) and keep a copy of
their tokenizer as RUN_DIR/tokenizer.model. eval, generate, export-hf and the post-training verbs
all read runs through the functions here.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from lmforge.config import config_from_mapping, read_yaml_mapping
from lmforge.errors import LmforgeError
from posttrain.config import PosttrainConfig
from pretrain.config import PretrainConfig, resolve_repo_path
from pretrain.model import ModelConfig

TOKENIZER_COPY = "tokenizer.model"
AnyRunConfig = Union[PretrainConfig, PosttrainConfig]


def _config_mapping(run_dir: Path) -> tuple[dict[str, Any], Path]:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        inside = f"; it is inside the run directory {path.parent.parent}: pass that" if (
            path.parent.parent / "config.yaml").is_file() else "; train with `lmforge train` first"
        raise LmforgeError(f"{run_dir}: not an lmforge run directory (no config.yaml){inside}")
    return read_yaml_mapping(path), path


def is_posttrain(config: AnyRunConfig) -> bool:
    return isinstance(config, PosttrainConfig)


def load_run_config(run_dir: Path) -> AnyRunConfig:
    """The resolved config a run saved as RUN_DIR/config.yaml: a PretrainConfig, or a PosttrainConfig
    for a post-training run (its mapping has an `init` section)."""
    data, path = _config_mapping(run_dir)
    schema = PosttrainConfig if "init" in data else PretrainConfig
    return config_from_mapping(schema, data, str(path))


@dataclass(frozen=True)
class _ModelOnly:
    model: ModelConfig


def run_model_config(run_dir: Path) -> ModelConfig:
    """The `model` section of RUN_DIR/config.yaml, whatever made the run (other sections are not read)."""
    data, path = _config_mapping(run_dir)
    if not isinstance(data.get("model"), dict):
        raise LmforgeError(f"{path}: has no model section")
    return config_from_mapping(_ModelOnly, {"model": data["model"]}, str(path)).model


def training_shards(config: AnyRunConfig) -> tuple[Path, ...]:
    """The shard directories a run trained on (pretraining's data.path); () for a post-training run (JSONL)."""
    return () if is_posttrain(config) else tuple(resolve_repo_path(p) for p in config.data.path)


def _manifest_tokenizer(shard_dir: Path) -> Path | None:
    import json

    try:
        return Path(json.loads((shard_dir / "manifest.json").read_text())["tokenizer"]["path"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def run_tokenizer_path(run_dir: Path, fix: str = "") -> Path:
    """The sentencepiece model a run was trained with, the first found of: RUN_DIR/tokenizer.model
    (post-training's copy), the one `lmforge import-hf` kept, init.tokenizer, the copy beside the
    first shard directory (data.path), and the path that shard directory's manifest names.

    Reads only those keys of config.yaml, so any run (pretrain, import-hf, post-training) qualifies.
    `fix` is appended to the error, e.g. "pass --tokenizer PATH".
    """
    from pretrain.hf_tokenizer import SOURCE_TOKENIZER_DIR

    run_dir = Path(run_dir)
    candidates = [run_dir / TOKENIZER_COPY, run_dir / SOURCE_TOKENIZER_DIR / TOKENIZER_COPY]
    if (run_dir / "config.yaml").is_file():
        data = read_yaml_mapping(run_dir / "config.yaml")
        init_tokenizer = (data.get("init") or {}).get("tokenizer")
        if init_tokenizer:
            candidates.append(resolve_repo_path(Path(init_tokenizer)))
        shard_dirs = (data.get("data") or {}).get("path")
        if isinstance(shard_dirs, (str, list)) and shard_dirs:
            shard_dir = resolve_repo_path(Path(shard_dirs if isinstance(shard_dirs, str) else shard_dirs[0]))
            candidates.append(shard_dir / TOKENIZER_COPY)
            candidates += [p for p in [_manifest_tokenizer(shard_dir)] if p is not None]
    for path in candidates:
        path = path / TOKENIZER_COPY if path.is_dir() else path
        if path.is_file():
            return path
    raise LmforgeError(f"{run_dir}: the tokenizer the run was trained with was not found "
                       f"({', '.join(map(str, candidates))}){'; ' + fix if fix else ''}")


def load_run_tokenizer(run_dir: Path, model: ModelConfig, path: Path | None = None):
    """The run's data_prep.tokenizer.Tokenizer (or the one at `path`), checked to have model.vocab_size pieces."""
    from data_prep.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(path if path is not None else run_tokenizer_path(run_dir))
    if model.vocab_size != tokenizer.vocab_size:
        raise LmforgeError(f"{Path(run_dir) / 'config.yaml'}: model.vocab_size = {model.vocab_size} but the tokenizer "
                           f"{tokenizer.model_path} has {tokenizer.vocab_size} pieces: not the tokenizer the model was trained with")
    return tokenizer
