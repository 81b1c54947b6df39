"""RLHF with PPO: `lmforge ppo --set init.from_run=SFT_RUN --set ppo.reward_run=REWARD_RUN --set data.train=PROMPTS.jsonl`.

Actor (the policy, from init.from_run) and critic (a value head, from the reward model or the
policy) are DeepSpeed engines; the reference (a frozen copy of the starting policy) and the reward
model are frozen (plain modules or ZeRO-3 inference engines). One iteration (train.max_steps counts
them): sample ppo.rollout_batch_size prompts per rank, generate with the KV cache, score, add the
per-token KL penalty, compute GAE advantages, then ppo.epochs passes of clipped policy and value
updates in minibatches of train.micro_batch_size × train.grad_accum_steps. Metrics go to
RUN_DIR/metrics.jsonl; the actor's checkpoints to RUN_DIR/checkpoints, the critic's to RUN_DIR/critic.
"""
from __future__ import annotations

import time
from typing import Sequence

from lmforge import distributed
from lmforge.distributed import launcher_world_size
from lmforge.errors import run_cli
from posttrain.config import load_posttrain_config
from posttrain.job import parse_args, start_ranks
from posttrain.ppo_job import actor_train_section, prepare_ppo


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args("ppo", __doc__.splitlines()[0], "ppo", argv)
    config = load_posttrain_config(args.config, args.set)
    ppo_job = prepare_ppo(config, launcher_world_size())
    from posttrain.ppo_trainer import PPOTrainer  # DeepSpeed is imported only once every input is checked

    job, info = start_ranks(ppo_job.job, actor_train_section(ppo_job.job.config), verb="ppo")
    if job is not ppo_job.job:
        ppo_job = prepare_ppo(job.config, info.world_size)
    try:
        trainer = PPOTrainer(ppo_job, info)
        if trainer.step >= job.config.train.max_steps:
            if distributed.is_main():
                print(f"nothing to do: {job.config.run.dir} already at step {trainer.step} ≥ train.max_steps = "
                      f"{job.config.train.max_steps}", flush=True)
            return 0
        started = time.perf_counter()
        last = trainer.run()
        if distributed.is_main() and last:
            keys = ("reward", "kl", "kl_coef", "entropy", "clip_fraction", "value_loss", "response_length")
            summary = ", ".join(f"{k}={last[k]:.4g}" for k in keys if isinstance(last.get(k), float))
            print(f"ppo done at iteration {trainer.step} ({time.perf_counter() - started:.0f}s): {summary}", flush=True)
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    distributed.exit_process(run_cli(main))
