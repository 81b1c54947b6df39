"""What a PPO run needs before any process group: its checks, its prompts, the reward run, and the
actor's and critic's train sections (posttrain/ppo.py is the verb, posttrain/ppo_trainer.py the loop)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lmforge.distributed import bf16_supported
from lmforge.errors import LmforgeError
from lmforge.run_layout import metrics_path
from posttrain.config import PosttrainConfig
from posttrain.formats import PROMPT_SHAPE, parse_prompt, split_records
from posttrain.job import Job, prepare_job, run_model_config, run_tokenizer_path
from posttrain.template import render_prompt
from pretrain.config import TrainConfig, resolve_repo_path
from pretrain.ds_config import build_deepspeed_config


def updates_per_iteration(config: PosttrainConfig) -> int:
    t, p = config.train, config.ppo
    return p.epochs * (p.rollout_batch_size // (t.micro_batch_size * t.grad_accum_steps))


def actor_train_section(config: PosttrainConfig) -> TrainConfig:
    """train.* with max_steps/warmup_steps in optimizer steps (the YAML counts PPO iterations), for DeepSpeed's schedule."""
    n = max(1, updates_per_iteration(config))
    t = config.train
    return replace(t, max_steps=t.max_steps * n, warmup_steps=t.warmup_steps * n)


def critic_train_section(config: PosttrainConfig) -> TrainConfig:
    actor = actor_train_section(config)
    lr = config.ppo.critic_lr
    return replace(actor, lr=lr, min_lr=lr * actor.min_lr / actor.lr)


@dataclass(frozen=True)
class PPOJob:
    job: Job
    critic_ds_config: dict[str, Any]
    prompts: list[list[int]]
    reward_model_config: Any
    """The reward run's ModelConfig, or None with a reward function."""


def check_ppo(config: PosttrainConfig) -> list[str]:
    p, t = config.ppo, config.train
    found = []
    if (p.reward_run is None) == (p.reward_function is None):
        found.append("ppo.reward_run and ppo.reward_function: set exactly one (a reward-model run, or a programmatic reward)")
    if p.rollout_batch_size % (t.micro_batch_size * t.grad_accum_steps):
        found.append(f"ppo.rollout_batch_size = {p.rollout_batch_size}: must be a multiple of train.micro_batch_size × "
                     f"train.grad_accum_steps = {t.micro_batch_size * t.grad_accum_steps}")
    if p.critic_from == "reward" and p.reward_run is None:
        found.append("ppo.critic_from = 'reward' needs ppo.reward_run; use 'policy' with a reward function")
    if config.data.train is None:
        found.append("data.train is required: a JSONL file of " + PROMPT_SHAPE)
    return found


def check_reward_run(run_dir: Path) -> None:
    """ppo.reward_run must be a reward model (`lmforge reward`): a language model's scalar head does not exist,
    so every rollout would score 0. Told by the checkpoint record's verb (metrics for runs saved before it)."""
    import json

    from pretrain import checkpoint

    tag = checkpoint.latest_tag(run_dir)
    if tag is None:
        raise LmforgeError(f"ppo.reward_run = {run_dir}: no complete checkpoint there; train one with `lmforge reward`")
    record = checkpoint.read_record(checkpoint.checkpoints_dir(run_dir) / tag)
    verb = record.get("verb")
    if verb is None and "model" in record:
        verb = "train"  # only `lmforge train` puts the model section in its records
    if verb is None:  # a post-training run saved before records named the verb: reward runs log accuracy
        try:
            with open(metrics_path(run_dir), encoding="utf-8") as lines:
                verb = "reward" if "accuracy" in json.loads(next(lines, "{}")) else None
        except (OSError, ValueError):
            verb = None
    if verb != "reward":
        what = f"a '{verb}' run" if verb else "not a run of `lmforge reward`"
        raise LmforgeError(f"ppo.reward_run = {run_dir}: {what}, not a reward model (its scores would be meaningless); "
                           "set it to the run.dir of `lmforge reward`")


def prepare_ppo(config: PosttrainConfig, world_size: int) -> PPOJob:
    """Every check before any process group: config, prompts, reward run and its tokenizer, both DeepSpeed JSONs."""
    from data_prep.tokenizer import Tokenizer
    from posttrain.reward_functions import resolve_reward_function

    if problems := check_ppo(config):
        raise LmforgeError("; ".join(problems))
    job = prepare_job(config, world_size, actor_train_section(config))
    cfg = job.config
    total = cfg.data.max_prompt_len + cfg.ppo.max_new_tokens
    if total > cfg.model.max_seq_len:
        raise LmforgeError(f"data.max_prompt_len + ppo.max_new_tokens = {total}: must not exceed model.max_seq_len = "
                           f"{cfg.model.max_seq_len}")
    reward_config = None
    if cfg.ppo.reward_run is not None:
        reward_run = resolve_repo_path(cfg.ppo.reward_run)
        check_reward_run(reward_run)
        reward_config = run_model_config(reward_run)
        if Tokenizer.load(run_tokenizer_path(reward_run)).fingerprint != job.tokenizer.fingerprint:
            raise LmforgeError(f"ppo.reward_run = {reward_run}: trained with another tokenizer than the policy's "
                               f"({cfg.init.tokenizer})")
        job = replace(job, config=replace(cfg, ppo=replace(cfg.ppo, reward_run=reward_run)))
    else:
        resolve_reward_function(cfg.ppo.reward_function)
    if cfg.ppo.monitor_function is not None:
        resolve_reward_function(cfg.ppo.monitor_function, "ppo.monitor_function")
    records, _ = split_records(cfg.data.train, None, 0.0, parse_prompt, PROMPT_SHAPE)
    prompts = [render_prompt(job.tokenizer, p, cfg.data.max_prompt_len) for p in records]
    critic_ds = build_deepspeed_config(resolve_repo_path(cfg.deepspeed.config), critic_train_section(cfg), world_size,
                                       bf16_supported())
    return PPOJob(job, critic_ds, prompts, reward_config)
