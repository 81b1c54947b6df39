"""`lmforge import-hf --model DIR --output RUN_DIR`: an HF Llama / GPT-2 checkpoint as an lmforge run.

RUN_DIR gets config.yaml (the model section from DIR/config.json, the rest from --config / --set,
ZeRO-0 unless they name another DeepSpeed JSON) and a step-0 DeepSpeed checkpoint of the mapped
weights, written by a real engine (`pretrain.engine.build_engine` + `pretrain.checkpoint.save`).
`lmforge train --config RUN_DIR/config.yaml --set data.path=[SHARDS]` then resumes from it, i.e.
continues pretraining or fine-tunes from the HF weights. A checkpoint's layout depends on the ZeRO
stage and the number of ranks, so run the import as you will train: plain (1 rank) by default, or
under torchrun with the same --set deepspeed.config=... for a sharded ZeRO-3 run.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from lmforge import ownership, run_lock
from lmforge.config import config_from_mapping, config_to_dict, parse_overrides, read_yaml_mapping, save_config
from lmforge.errors import LmforgeError, run_cli
from lmforge.run_layout import SOURCE_TOKENIZER_DIR, config_path
from pretrain.config import PretrainConfig, resolve_config_path
from pretrain.model import ModelConfig, Transformer
from pretrain.run_weights import check_state_dict
from run_tools.hf_mapping import from_hf, model_config_from_hf
from run_tools.hf_tokenizer import keep_source_tokenizer
from run_tools.hf_weights import load_hf_weights

DEFAULT_DEEPSPEED = "ds_configs/zero0.json"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lmforge import-hf", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, metavar="DIR", help="transformers model directory (LlamaForCausalLM, MixtralForCausalLM or GPT2LMHeadModel)")
    parser.add_argument("--output", type=Path, required=True, metavar="RUN_DIR", help="run directory to create")
    parser.add_argument("--config", default=None, help="preset or YAML for the train/data/deepspeed sections (its model section is replaced)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value (not model.*)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def read_hf_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise LmforgeError(f"{model_dir}: no config.json; not a transformers model directory")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise LmforgeError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise LmforgeError(f"{path}: expected a JSON object")
    return data


def tokenizer_vocab(model_dir: Path) -> int | None:
    """Pieces of DIR/tokenizer.model (the real vocab behind a padded embedding), if DIR ships one."""
    path = model_dir / "tokenizer.model"
    if not path.is_file():
        return None
    from data_prep.tokenizer import Tokenizer

    return Tokenizer.load(path).vocab_size


def run_config(model: ModelConfig, output: Path, preset: str | None, overrides: Sequence[str]) -> PretrainConfig:
    """The run's config: the preset (or defaults) with overrides, our model, run.dir = output."""
    path = resolve_config_path(preset) if preset is not None else None
    mapping: dict[str, Any] = read_yaml_mapping(path) if path is not None else {}
    for section, values in parse_overrides(overrides).items():
        if section == "model":
            raise LmforgeError(f"--set model.{next(iter(values))}: the model section comes from the HF config.json")
        current = mapping.get(section)
        mapping[section] = {**(current if isinstance(current, dict) else {}), **values}
    mapping["model"] = config_to_dict(model)
    mapping["run"] = {**(mapping.get("run") or {}), "dir": str(output)}
    if "config" not in (mapping.get("deepspeed") or {}):
        mapping["deepspeed"] = {**(mapping.get("deepspeed") or {}), "config": DEFAULT_DEEPSPEED}
    train = mapping.setdefault("train", {}) or {}
    train.setdefault("seq_len", min(PretrainConfig().train.seq_len, model.max_seq_len))
    mapping["train"] = train
    return config_from_mapping(PretrainConfig, mapping, str(path) if path else "import-hf")


def mapped_weights(model_dir: Path, model: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict from DIR's weights, checked tensor by tensor against the model config."""
    with torch.device("meta"):
        expected = list(Transformer(model).state_dict())
    state = from_hf(load_hf_weights(model_dir), model, expected, str(model_dir))
    check_state_dict(state, model, f"{model_dir} with its config.json")
    return state


def save_as_run(config: PretrainConfig, state: dict[str, torch.Tensor], model_dir: Path,
                hf: dict[str, Any]) -> tuple[str, list[str] | None]:
    """Writes config.yaml, the source tokenizer and a step-0 checkpoint of a DeepSpeed engine around the
    imported weights; returns the tag and, on rank 0, the tokenizer files kept (None on other ranks)."""
    from lmforge import distributed
    from lmforge.distributed import bf16_supported, launcher_world_size
    from pretrain import checkpoint
    from pretrain.config import resolve_repo_path
    from pretrain.ds_config import build_deepspeed_config
    from pretrain.engine import build_engine

    ds_path = resolve_repo_path(config.deepspeed.config)
    build_deepspeed_config(ds_path, config.train, launcher_world_size(), bf16_supported())  # a bad JSON fails here
    info = distributed.init_distributed("import-hf")
    try:
        run_lock.acquire_on_main(config.run.dir, distributed.is_main(), distributed.broadcast_object)
        ds_config = build_deepspeed_config(ds_path, config.train, info.world_size, bf16_supported())
        model = Transformer(config.model)
        model.load_state_dict(state)
        engine = build_engine(model, ds_config, config.train.weight_decay, compile_model=False,
                              decay_embeddings=config.train.decay_embeddings)
        kept = None
        if distributed.is_main():
            save_config(config, config_path(config.run.dir))
            kept = keep_source_tokenizer(model_dir, hf, config.run.dir)
        client_state = {"step": 0, "seed": config.train.seed, "world_size": info.world_size, "imported_from": str(model_dir)}
        return checkpoint.save(engine, config.run.dir, 0, client_state, config.train.keep_last), kept
    finally:
        distributed.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    from pretrain import checkpoint

    args = parse_args(argv)
    model_dir, output = args.model, args.output
    hf = read_hf_config(model_dir)
    model = model_config_from_hf(hf, str(model_dir / "config.json"), tokenizer_vocab(model_dir))
    config = run_config(model, output, args.config, args.set)
    ownership.check_output(output, "run", "import-hf", "--output", {"--model": model_dir})
    if checkpoint.complete_tags(output) or (checkpoint.checkpoints_dir(output) / checkpoint.LATEST_FILE).exists():
        raise LmforgeError(f"--output {output}: already holds checkpoints; choose a new run directory")
    state = mapped_weights(model_dir, model)
    ownership.claim(output, "run", "import-hf", source=str(model_dir))
    tag, kept = save_as_run(config, state, model_dir, hf)
    if kept is None:
        return 0
    params = sum(v.numel() for k, v in state.items() if not (model.tied and k == "lm_head.weight"))
    print(f"imported {model_dir} ({model.arch}, {params / 1e6:.2f}M parameters) as {checkpoint.checkpoints_dir(output) / tag}",
          flush=True)
    if "tokenizer.model" in kept:
        print(f"shard data with: lmforge prep shards --tokenizer {output / SOURCE_TOKENIZER_DIR / 'tokenizer.model'} ...")
    print(f"continue with: lmforge train --config {output / 'config.yaml'} --set data.path=[SHARD_DIR]", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
