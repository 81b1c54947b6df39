"""The GRPO loop: rollouts in groups, group-relative advantages, clipped updates with a KL term, checkpoints and resume (see posttrain/grpo.py)."""
from __future__ import annotations

import time
from typing import Any

import torch

from lmforge import distributed
from posttrain.batches import ExampleOrder
from posttrain.frozen_models import build_frozen, weight_dtype
from posttrain.grpo_job import GRPOJob
from posttrain.job import build_initial
from posttrain.loop import mean_over_ranks, resume, run_rollout_iterations
from posttrain.lora import with_lora
from posttrain.losses import group_advantages, grpo_loss
from posttrain.rollout import Samples, policy_logprobs, rollout_generator, sample
from posttrain.scoring import Scorer
from pretrain import checkpoint
from pretrain.engine import build_engine
from pretrain.model import Transformer


class GRPOTrainer:
    def __init__(self, grpo_job: GRPOJob, info: distributed.DistributedInfo):
        self.job, self.info = grpo_job.job, info
        cfg = self.config = self.job.config
        g, train = cfg.grpo, cfg.train
        self.tokenizer = self.job.tokenizer
        self.dtype = weight_dtype(self.job.ds_config)
        policy = with_lora(build_initial(cfg, Transformer), cfg.lora, "grpo")
        self.actor = build_engine(policy, self.job.ds_config, train.weight_decay, train.compile, train.decay_embeddings)
        self.reference = None
        if g.kl_coef > 0:
            self.reference = build_frozen(build_initial(cfg, Transformer), self.job.ds_config, g.frozen_models, info.device)
        self.score = Scorer(self.tokenizer, info.device, g.reward_function, "grpo.reward_function", g.reward_run,
                            grpo_job.reward_model_config, self.job.ds_config, g.frozen_models)
        self.order = ExampleOrder(grpo_job.prompts, train.seed)
        self.step = resume(self.actor, cfg.run.dir, "grpo", cfg.run.resume_fallback)

    def save(self) -> None:
        state = {"step": self.step, "verb": "grpo", "seed": self.config.train.seed, "world_size": self.info.world_size}
        checkpoint.save(self.actor, self.config.run.dir, self.step, state, self.config.train.keep_last, {"verb": "grpo"})

    def rollout(self) -> dict[str, Any]:
        """group_size responses to each of this rank's prompts (rows of one group are consecutive), scored."""
        g = self.config.grpo
        prompts = self.order.micro_batch(self.step, 0, g.prompts_per_rank, 1, self.info.rank, self.info.world_size)
        self.actor.eval()
        generator = rollout_generator(self.config.train.seed, self.step, self.info.rank, 0)
        samples = sample(self.actor, self.config.model, [p for p in prompts for _ in range(g.group_size)],
                         g.max_new_tokens, g.temperature, g.top_k, self.tokenizer.eod_id, self.tokenizer.pad_id,
                         generator, self.info.device, self.dtype)
        with torch.no_grad():
            old = policy_logprobs(self.actor, samples, g.temperature)
            ref = policy_logprobs(self.reference, samples, g.temperature) if self.reference is not None else old
        scores = self.score(samples)
        return {"samples": samples, "old": old, "ref": ref, "scores": scores,
                "advantages": group_advantages(scores, g.group_size, g.scale_rewards)}

    def update(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        g, train = self.config.grpo, self.config.train
        samples: Samples = batch["samples"]
        mask = samples.response_mask
        self.actor.train()
        sums: dict[str, torch.Tensor] = {}
        count = 0
        rows = samples.sequences.shape[0]
        for epoch in range(g.epochs):
            generator = rollout_generator(train.seed, self.step, self.info.rank, 1 + epoch)
            order = torch.randperm(rows, generator=generator).to(samples.sequences.device)
            for start in range(0, rows, train.micro_batch_size):
                idx = order[start : start + train.micro_batch_size]
                logp = policy_logprobs(self.actor, samples, g.temperature, idx)
                loss, stats = grpo_loss(logp, batch["old"][idx], batch["ref"][idx], batch["advantages"][idx], mask[idx],
                                        g.clip_range, g.kl_coef)
                self.actor.backward(loss)
                self.actor.step()
                for key, value in {"loss": loss.detach(), **stats}.items():
                    sums[key] = sums.get(key, 0.0) + value.float()
                count += 1
        return {k: v / count for k, v in sums.items()}

    def run(self) -> dict[str, Any]:
        return run_rollout_iterations(self, "grpo", self._iteration)

    def _iteration(self) -> tuple[dict[str, float], dict[str, Any]]:
        clock = time.perf_counter()
        batch = self.rollout()
        rollout_seconds = time.perf_counter() - clock
        scores = batch["scores"]
        stats = {"reward": scores.mean(), "reward_std": scores.view(-1, self.config.grpo.group_size).std(-1).mean(),
                 "response_length": batch["samples"].lengths.float().mean(), **self.update(batch)}
        return mean_over_ranks(stats), {"rollout_seconds": rollout_seconds}
