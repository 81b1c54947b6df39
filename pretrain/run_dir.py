"""Reading any run directory, pretraining's or post-training's: its model section and tokenizer
(its weights: pretrain.run_weights; the whole config, whichever kind of run: run_tools.run_config).

`lmforge train` and `lmforge import-hf` save a PretrainConfig as RUN_DIR/config.yaml and trained on
shards (`data.path`, each with its tokenizer.model beside it). `lmforge sft|reward|ppo|dpo` save a
PosttrainConfig (it has an `init` section; `data` names JSONL files, not shards) and keep a copy of
their tokenizer as RUN_DIR/tokenizer.model. eval, generate, export-hf and the post-training verbs
all read runs through the functions here. Only the keys both kinds share are read, so nothing here
needs post-training's config (imports go downward: lmforge <- data_prep <- pretrain <- posttrain).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.config import config_from_mapping, read_yaml_mapping
from lmforge.errors import LmforgeError
from lmforge.run_layout import CONFIG_FILE, SOURCE_TOKENIZER_DIR, TOKENIZER_COPY, config_path
from pretrain.config import resolve_repo_path
from pretrain.model import ModelConfig


def config_mapping(run_dir: Path) -> tuple[dict[str, Any], Path]:
    """RUN_DIR/config.yaml as a mapping (not yet checked against a schema), and its path."""
    path = config_path(run_dir)
    if not path.is_file():
        inside = f"; it is inside the run directory {path.parent.parent}: pass that" if (
            path.parent.parent / CONFIG_FILE).is_file() else "; train with `lmforge train` first"
        raise LmforgeError(f"{run_dir}: not an lmforge run directory (no config.yaml){inside}")
    return read_yaml_mapping(path), path


@dataclass(frozen=True)
class _ModelOnly:
    model: ModelConfig


def run_model_config(run_dir: Path) -> ModelConfig:
    """The `model` section of RUN_DIR/config.yaml, whatever made the run (other sections are not read)."""
    data, path = config_mapping(run_dir)
    if not isinstance(data.get("model"), dict):
        raise LmforgeError(f"{path}: has no model section")
    return config_from_mapping(_ModelOnly, {"model": data["model"]}, str(path)).model


def _manifest_tokenizer(shard_dir: Path) -> Path | None:
    from data_prep.manifest import load_manifest

    try:
        return load_manifest(shard_dir).tokenizer.path
    except LmforgeError:
        return None


def run_tokenizer_path(run_dir: Path, fix: str = "") -> Path:
    """The sentencepiece model a run was trained with, the first found of: RUN_DIR/tokenizer.model
    (post-training's copy), the one `lmforge import-hf` kept, init.tokenizer, the copy beside the
    first shard directory (data.path), and the path that shard directory's manifest names.

    Reads only those keys of config.yaml, so any run (pretrain, import-hf, post-training) qualifies.
    `fix` is appended to the error, e.g. "pass --tokenizer PATH".
    """
    run_dir = Path(run_dir)
    candidates = [run_dir / TOKENIZER_COPY, run_dir / SOURCE_TOKENIZER_DIR / TOKENIZER_COPY]
    if config_path(run_dir).is_file():
        data = read_yaml_mapping(config_path(run_dir))
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
        raise LmforgeError(f"{config_path(run_dir)}: model.vocab_size = {model.vocab_size} but the tokenizer "
                           f"{tokenizer.model_path} has {tokenizer.vocab_size} pieces: not the tokenizer the model was trained with")
    return tokenizer
