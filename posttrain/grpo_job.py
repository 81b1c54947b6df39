"""What a GRPO run needs before any process group: its checks, its prompts, the reward source and the
policy's train section (posttrain/grpo.py is the verb, posttrain/grpo_trainer.py the loop)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from lmforge.errors import LmforgeError
from posttrain.config import PosttrainConfig
from posttrain.job import Job, prepare_job
from posttrain.rollout_job import check_reward_source, rollout_prompts, stretched_train_section
from pretrain.config import TrainConfig


def rollouts_per_rank(config: PosttrainConfig) -> int:
    return config.grpo.prompts_per_rank * config.grpo.group_size


def policy_train_section(config: PosttrainConfig) -> TrainConfig:
    t = config.train
    updates = config.grpo.epochs * (rollouts_per_rank(config) // (t.micro_batch_size * t.grad_accum_steps))
    return stretched_train_section(t, updates)


@dataclass(frozen=True)
class GRPOJob:
    job: Job
    prompts: list[list[int]]
    reward_model_config: Any
    """The reward run's ModelConfig, or None with a reward function."""


def prepare_grpo(config: PosttrainConfig, world_size: int) -> GRPOJob:
    """Every check before any process group: config, reward function or run, prompts, the DeepSpeed JSON."""
    minibatch = config.train.micro_batch_size * config.train.grad_accum_steps
    if rollouts_per_rank(config) % minibatch:
        raise LmforgeError(f"grpo.prompts_per_rank × grpo.group_size = {rollouts_per_rank(config)}: must be a multiple "
                           f"of train.micro_batch_size × train.grad_accum_steps = {minibatch}")
    job = prepare_job(config, world_size, policy_train_section(config))
    cfg = job.config
    reward_run, reward_config = check_reward_source(job, cfg.grpo.reward_run, cfg.grpo.reward_function, "grpo")
    job = replace(job, config=replace(cfg, grpo=replace(cfg.grpo, reward_run=reward_run)))
    return GRPOJob(job, rollout_prompts(job, cfg.grpo.max_new_tokens, "grpo"), reward_config)
