"""What a PPO run needs before any process group: its checks, its prompts, the reward run, and the
actor's and critic's train sections (posttrain/ppo.py is the verb, posttrain/ppo_trainer.py the loop)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from lmforge.distributed import bf16_supported
from lmforge.errors import LmforgeError
from posttrain.config import PosttrainConfig
from posttrain.formats import PROMPT_SHAPE
from posttrain.job import Job, prepare_job
from posttrain.rollout_job import check_reward_source, rollout_prompts, stretched_train_section
from pretrain.config import TrainConfig, resolve_repo_path
from pretrain.ds_config import build_deepspeed_config


def updates_per_iteration(config: PosttrainConfig) -> int:
    t, p = config.train, config.ppo
    return p.epochs * (p.rollout_batch_size // (t.micro_batch_size * t.grad_accum_steps))


def actor_train_section(config: PosttrainConfig) -> TrainConfig:
    """train.* with max_steps/warmup_steps in optimizer steps (the YAML counts PPO iterations), for DeepSpeed's schedule."""
    return stretched_train_section(config.train, updates_per_iteration(config))


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


def prepare_ppo(config: PosttrainConfig, world_size: int) -> PPOJob:
    """Every check before any process group: config, prompts, reward run and its tokenizer, both DeepSpeed JSONs."""
    from posttrain.reward_functions import resolve_reward_function

    if problems := check_ppo(config):
        raise LmforgeError("; ".join(problems))
    job = prepare_job(config, world_size, actor_train_section(config))
    cfg = job.config
    reward_run, reward_config = check_reward_source(job, cfg.ppo.reward_run, cfg.ppo.reward_function, "ppo")
    job = replace(job, config=replace(cfg, ppo=replace(cfg.ppo, reward_run=reward_run)))
    cfg = job.config
    if cfg.ppo.monitor_function is not None:
        resolve_reward_function(cfg.ppo.monitor_function, "ppo.monitor_function")
    prompts = rollout_prompts(job, cfg.ppo.max_new_tokens, "ppo")
    critic_ds = build_deepspeed_config(resolve_repo_path(cfg.deepspeed.config), critic_train_section(cfg), world_size,
                                       bf16_supported())
    return PPOJob(job, critic_ds, prompts, reward_config)
