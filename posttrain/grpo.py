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

from typing import Sequence

from lmforge import distributed
from lmforge.errors import run_cli
from posttrain.grpo_job import policy_train_section, prepare_grpo
from posttrain.rollout_job import run_rollout_verb


def _trainer(prepared, info):
    from posttrain.grpo_trainer import GRPOTrainer  # DeepSpeed is imported only once every input is checked

    return GRPOTrainer(prepared, info)


def main(argv: Sequence[str] | None = None) -> int:
    return run_rollout_verb("grpo", __doc__.splitlines()[0], argv, prepare_grpo, policy_train_section, _trainer,
                            ("reward", "reward_std", "kl", "clip_fraction", "response_length"))


if __name__ == "__main__":
    distributed.exit_process(run_cli(main))
