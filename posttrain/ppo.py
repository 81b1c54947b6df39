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

from typing import Sequence

from lmforge import distributed
from lmforge.errors import run_cli
from posttrain.ppo_job import actor_train_section, prepare_ppo
from posttrain.rollout_job import run_rollout_verb


def _trainer(prepared, info):
    from posttrain.ppo_trainer import PPOTrainer  # DeepSpeed is imported only once every input is checked

    return PPOTrainer(prepared, info)


def main(argv: Sequence[str] | None = None) -> int:
    return run_rollout_verb("ppo", __doc__.splitlines()[0], argv, prepare_ppo, actor_train_section, _trainer,
                            ("reward", "kl", "kl_coef", "entropy", "clip_fraction", "value_loss", "response_length"))


if __name__ == "__main__":
    distributed.exit_process(run_cli(main))
