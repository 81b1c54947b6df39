"""What every post-training verb does before and around its loop: resolve the starting run, the model
section and the tokenizer, merge the DeepSpeed JSON, check the run directory (all before any process
group exists), then load starting weights and save config.yaml + tokenizer.model into the run dir.
"""
from __future__ import annotations

import argparse
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import torch

from lmforge import ownership, run_lock
from lmforge.config import save_config
from lmforge.distributed import bf16_supported, launcher_world_size
from lmforge.errors import LmforgeError
from lmforge.files import write_atomic
from posttrain.config import PosttrainConfig
from posttrain.heads import ScalarHeadModel
from pretrain import checkpoint
from pretrain.config import TrainConfig, resolve_repo_path
from pretrain.ds_config import build_deepspeed_config, read_deepspeed_json
from pretrain.ds_json_checks import deepspeed_json_problems
from pretrain.model import ModelConfig, Transformer
from pretrain.run_checks import check_run_dir
# Reading any run (pretrain, import-hf, post-training) is pretrain.run_dir's; posttrain's callers import these from here too.
from lmforge.run_layout import TOKENIZER_COPY, config_path
from pretrain.run_dir import run_model_config, run_tokenizer_path  # noqa: F401


def parse_args(verb: str, description: str, default_config: str, argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"lmforge {verb}", description=description)
    parser.add_argument("--config", default=default_config,
                        help=f"preset name in configs/posttrain/ or a YAML path (default: {default_config})")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


@dataclass(frozen=True)
class Job:
    """A checked config (model section and tokenizer resolved), its DeepSpeed JSON and tokenizer."""

    config: PosttrainConfig
    ds_config: dict[str, Any]
    tokenizer: Any


def _resolve_model(config: PosttrainConfig) -> ModelConfig:
    if config.init.from_run is None:
        return config.model
    run_dir = resolve_repo_path(config.init.from_run)
    model = run_model_config(run_dir)
    if config.model not in (ModelConfig(), model):
        raise LmforgeError(f"model: the model section comes from init.from_run = {run_dir}/config.yaml; "
                           "remove it (or set init.from_run to null to train from scratch)")
    return model


def prepare_job(config: PosttrainConfig, world_size: int, train: TrainConfig | None = None) -> Job:
    """Checks everything a verb needs before any process group; `train` overrides the section given to DeepSpeed."""
    from data_prep.tokenizer import Tokenizer

    init = config.init
    if init.from_run is not None:
        run_dir = resolve_repo_path(init.from_run)
        tag = init.tag or checkpoint.latest_tag(run_dir)
        if tag is None or not (checkpoint.checkpoints_dir(run_dir) / tag / checkpoint.COMPLETE_MARKER).is_file():
            raise LmforgeError(f"init.from_run = {run_dir}: no complete checkpoint{f' {tag}' if tag else ''} there")
        init = replace(init, from_run=run_dir, tag=tag)
    model = _resolve_model(config)
    if init.tokenizer is not None:
        tokenizer_path = resolve_repo_path(init.tokenizer)
    else:
        tokenizer_path = run_tokenizer_path(init.from_run, fix="set init.tokenizer=PATH")
    tokenizer = Tokenizer.load(tokenizer_path)
    if model.vocab_size is None:
        model = model.with_vocab(tokenizer.vocab_size)
    elif model.vocab_size != tokenizer.vocab_size:
        raise LmforgeError(f"model.vocab_size = {model.vocab_size} but the tokenizer {tokenizer_path} has "
                           f"{tokenizer.vocab_size} tokens; set init.tokenizer to the one the model was trained with")
    problems = model.problems()
    if config.train.seq_len > model.max_seq_len:
        problems.append(f"train.seq_len = {config.train.seq_len}: must not exceed model.max_seq_len = {model.max_seq_len}")
    if problems:
        raise LmforgeError("; ".join(problems))
    tokenizer_path = tokenizer.model_path or tokenizer_path
    config = replace(config, model=model, init=replace(init, tokenizer=Path(tokenizer_path)))
    ds_path = resolve_repo_path(config.deepspeed.config)
    ds_problems = deepspeed_json_problems(read_deepspeed_json(ds_path), ds_path)  # as lmforge train judges it
    if ds_problems:
        raise LmforgeError("\n".join(ds_problems))
    ds_config = build_deepspeed_config(ds_path, train or config.train, world_size, bf16_supported())
    return Job(config, ds_config, tokenizer)


def start_ranks(job: Job, train: TrainConfig | None = None, verb: str = "sft"):
    """Checks run.dir may be written by `verb` (lmforge.ownership: not an input, not another kind of run),
    creates it with its marker (the last check: after the verb's data was read), starts the process group
    and locks run.dir (lmforge.run_lock); returns (job, DistributedInfo), the job re-merged if MPI only now
    told the world size."""
    from lmforge import distributed

    run_dir = job.config.run.dir
    ownership.check_output(run_dir, "posttrain-run", verb, "run.dir", ownership.config_paths(job.config), resolve_repo_path)
    check_run_dir(run_dir)
    ownership.claim(run_dir, "posttrain-run", verb)
    info = distributed.init_distributed(verb)
    if info.world_size != launcher_world_size():
        job = prepare_job(job.config, info.world_size, train)
    run_lock.acquire_on_main(run_dir, distributed.is_main(), distributed.broadcast_object)
    return job, info


def load_weights(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Loads a consolidated state dict into a Transformer or a ScalarHeadModel.

    A plain LM's weights go into a ScalarHeadModel's trunk (its head stays at zero); a ScalarHeadModel's
    weights (keys `lm.*`, `head.*`) load as they are. A tied LM head may be absent from the state.
    """
    target = module
    if isinstance(module, ScalarHeadModel) and not any(k.startswith("lm.") for k in state):
        target = module.lm
    elif isinstance(module, Transformer) and any(k.startswith("lm.") for k in state):
        raise LmforgeError(f"{source}: holds a reward/value model (scalar head); a language model run is needed here")
    missing, unexpected = target.load_state_dict(state, strict=False)
    # A tied head is the embedding; a scalar-head model's LM head is frozen and unused, and
    # DeepSpeed's zero_to_fp32 keeps only trained parameters.
    unused = module.config.tied or (isinstance(module, ScalarHeadModel) and target is module)
    missing = [k for k in missing if not (k.endswith("lm_head.weight") and unused)]
    if missing or unexpected:
        raise LmforgeError(f"{source}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


def starting_state(run_dir: Path, tag: str | None) -> tuple[dict[str, torch.Tensor], str]:
    """fp32 weights of a run's checkpoint (any ZeRO stage; a reward model's too) and the tag read."""
    from pretrain.run_weights import run_state_dict

    return run_state_dict(run_dir, checkpoint.step_of_tag(tag) if tag else None)


def build_initial(config: PosttrainConfig, kind: type, seed_offset: int = 0) -> torch.nn.Module:
    """A Transformer or ScalarHeadModel with init.from_run's weights, or seeded random weights."""
    torch.manual_seed(config.train.seed + seed_offset)
    module = kind(config.model)
    if config.init.from_run is not None:
        state, tag = starting_state(config.init.from_run, config.init.tag)
        load_weights(module, state, str(checkpoint.checkpoints_dir(config.init.from_run) / tag))
    return module


def save_run_files(job: Job, main: bool) -> None:
    """RUN_DIR/config.yaml (resolved) and RUN_DIR/tokenizer.model, on the main rank, atomically."""
    if not main:
        return
    run_dir = job.config.run.dir
    save_config(job.config, config_path(run_dir))
    target = run_dir / TOKENIZER_COPY
    source = Path(job.config.init.tokenizer)
    if source.resolve() != target.resolve():
        write_atomic(target, lambda temp: shutil.copyfile(source, temp))
