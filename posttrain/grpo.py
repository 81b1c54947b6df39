"""GRPO with verifiable rewards: `lmforge grpo --set init.from_run=SFT_RUN --set data.train=PROMPTS.jsonl`.

Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath): no critic. One iteration
(train.max_steps counts them): grpo.prompts_per_rank prompts per rank, grpo.group_size responses
each, sampled with the KV cache and the attention mask; each response scored by grpo.reward_function
(a Python callable, e.g. python_syntax's ast.parse) or a grpo.reward_run reward model; its advantage
is its reward minus its group's mean, over the group's std (not with grpo.scale_rewards: false, Dr.
GRPO); then grpo.epochs passes of the clipped policy-gradient loss with a k3 KL term to the frozen
reference (posttrain.losses.grpo_loss). The policy checkpoints to RUN_DIR/checkpoints (a plain LM
run that export-hf, generate and eval read); metrics go to RUN_DIR/metrics.jsonl.
"""
from __future__ import annotations

import time
from typing import Sequence

from lmforge import distributed
from lmforge.distributed import launcher_world_size
from lmforge.errors import run_cli
from posttrain.config import load_posttrain_config
from posttrain.grpo_job import policy_train_section, prepare_grpo
from posttrain.job import parse_args, start_ranks


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args("grpo", __doc__.splitlines()[0], "grpo", argv)
    config = load_posttrain_config(args.config, args.set)
    grpo_job = prepare_grpo(config, launcher_world_size())
    from posttrain.grpo_trainer import GRPOTrainer  # DeepSpeed is imported only once every input is checked

    job, info = start_ranks(grpo_job.job, policy_train_section(grpo_job.job.config), verb="grpo")
    if job is not grpo_job.job:
        grpo_job = prepare_grpo(job.config, info.world_size)
    try:
        trainer = GRPOTrainer(grpo_job, info)
        if trainer.step >= job.config.train.max_steps:
            if distributed.is_main():
                print(f"nothing to do: {job.config.run.dir} already at step {trainer.step} ≥ train.max_steps = "
                      f"{job.config.train.max_steps}", flush=True)
            return 0
        started = time.perf_counter()
        last = trainer.run()
        if distributed.is_main() and last:
            keys = ("reward", "reward_std", "kl", "clip_fraction", "response_length")
            summary = ", ".join(f"{k}={last[k]:.4g}" for k in keys if isinstance(last.get(k), float))
            print(f"grpo done at iteration {trainer.step} ({time.perf_counter() - started:.0f}s): {summary}", flush=True)
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    distributed.exit_process(run_cli(main))
