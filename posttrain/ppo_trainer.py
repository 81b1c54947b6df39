"""The PPO loop: four models, rollouts, minibatch updates, metrics, checkpoints and resume (see posttrain/ppo.py)."""
from __future__ import annotations

import time
from typing import Any

import torch

from lmforge.errors import LmforgeError
from posttrain.batches import ExampleOrder
from posttrain.frozen_models import build_frozen, weight_dtype
from posttrain.heads import ScalarHeadModel
from posttrain.job import build_initial
from posttrain.lora import with_lora
from posttrain.loop import mean_over_ranks, run_rollout_iterations
from posttrain.losses import (KLController, RunningMoments, clipped_policy_loss, clipped_value_loss,
                              entropy_from_logits, masked_mean, token_logprobs)
from lmforge import distributed
from lmforge.run_layout import CRITIC_DIR
from posttrain.ppo_job import PPOJob
from posttrain.reward_functions import call_reward_function, resolve_reward_function
from posttrain.rollout import Experience, experience_stats, make_experience, response_slice, rollout_generator, sample
from posttrain.scoring import Scorer, decode, reward_module
from pretrain import checkpoint
from pretrain.engine import build_engine
from pretrain.model import Transformer



def _sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    return distributed.all_reduce_mean(x) * distributed.world_size()


class PPOTrainer:
    def __init__(self, ppo_job: PPOJob, info: distributed.DistributedInfo):
        self.ppo_job, self.job, self.info = ppo_job, ppo_job.job, info
        cfg = self.config = self.job.config
        self.tokenizer = self.job.tokenizer
        self.dtype = weight_dtype(self.job.ds_config)
        train = cfg.train
        actor = with_lora(build_initial(cfg, Transformer), cfg.lora, "ppo actor")
        self.actor = build_engine(actor, self.job.ds_config, train.weight_decay, train.compile, train.decay_embeddings)
        self.reference = build_frozen(build_initial(cfg, Transformer), self.job.ds_config, cfg.ppo.frozen_models, info.device)
        critic = with_lora(self._critic_module(), cfg.lora, "ppo critic")  # adapters and its value head train
        self.critic = build_engine(critic, ppo_job.critic_ds_config, train.weight_decay, train.compile,
                                   train.decay_embeddings)
        self.score = Scorer(self.tokenizer, info.device, cfg.ppo.reward_function, "ppo.reward_function",
                            cfg.ppo.reward_run, ppo_job.reward_model_config, self.job.ds_config, cfg.ppo.frozen_models)
        self.monitor = resolve_reward_function(cfg.ppo.monitor_function, "ppo.monitor_function") if cfg.ppo.monitor_function else None
        self.kl = KLController(cfg.ppo.kl_coef, cfg.ppo.kl_target, cfg.ppo.kl_horizon)
        self.moments = RunningMoments(_sum_over_ranks)
        self.order = ExampleOrder(ppo_job.prompts, train.seed)
        self.step = 0
        self._resume()

    def _critic_module(self) -> ScalarHeadModel:
        source = self.config.ppo.critic_from
        if source == "reward" or (source == "auto" and self.config.ppo.reward_run is not None):
            return reward_module(self.config.ppo.reward_run, self.ppo_job.reward_model_config)
        return build_initial(self.config, ScalarHeadModel)

    # ---- checkpoints -------------------------------------------------------------------------
    def _client_state(self) -> dict[str, Any]:
        return {"step": self.step, "verb": "ppo", "kl_coef": self.kl.coef, "moments": self.moments.state(),
                "seed": self.config.train.seed, "world_size": self.info.world_size}

    def save(self) -> None:
        run_dir, keep = self.config.run.dir, self.config.train.keep_last
        checkpoint.save(self.critic, run_dir / CRITIC_DIR, self.step, self._client_state(), keep)
        checkpoint.save(self.actor, run_dir, self.step, self._client_state(), keep, {"verb": "ppo"})  # `latest` last: both are there

    def _resume(self) -> None:
        from posttrain.loop import resume

        run_dir = self.config.run.dir
        self.step = resume(self.actor, run_dir, "ppo", self.config.run.resume_fallback)
        if self.step:
            damage = checkpoint.damage(run_dir / CRITIC_DIR, checkpoint.tag_for_step(self.step))
            if damage:
                raise LmforgeError(f"{damage[0]}; the critic of {checkpoint.checkpoints_dir(run_dir) / checkpoint.tag_for_step(self.step)} "
                                   "is damaged: train into a new run.dir")
            state = checkpoint.load(self.critic, run_dir / CRITIC_DIR, checkpoint.tag_for_step(self.step))
            self.kl.coef = float(state["kl_coef"])
            self.moments.load(state["moments"])

    # ---- rollouts ----------------------------------------------------------------------------
    def _normalise(self, scores: torch.Tensor) -> torch.Tensor:
        ppo = self.config.ppo
        if ppo.whiten_rewards:
            self.moments.update(scores)
            scores = (scores - self.moments.mean) / self.moments.std
        return scores.clamp(-ppo.reward_clip, ppo.reward_clip) if ppo.reward_clip > 0 else scores

    def _generator(self, salt: int) -> torch.Generator:
        return rollout_generator(self.config.train.seed, self.step, self.info.rank, salt)

    def rollout(self) -> Experience:
        ppo = self.config.ppo
        prompts = self.order.micro_batch(self.step, 0, ppo.rollout_batch_size, 1, self.info.rank, self.info.world_size)
        self.actor.eval()
        self.critic.eval()
        samples = sample(self.actor, self.config.model, prompts, ppo.max_new_tokens, ppo.temperature, ppo.top_k,
                         self.tokenizer.eod_id, self.tokenizer.pad_id, self._generator(0), self.info.device, self.dtype)
        return make_experience(samples, self.actor, self.critic, self.reference, self.score, self._normalise,
                               self.kl.coef, ppo.temperature, ppo.gamma, ppo.lam)

    # ---- updates -----------------------------------------------------------------------------
    def update(self, exp: Experience) -> dict[str, torch.Tensor]:
        ppo, train = self.config.ppo, self.config.train
        self.actor.train()
        self.critic.train()
        seq, mask, attention = exp.samples.sequences, exp.mask, exp.samples.attention_mask
        sums: dict[str, torch.Tensor] = {}
        count = 0
        for epoch in range(ppo.epochs):
            order = torch.randperm(seq.shape[0], generator=self._generator(1 + epoch)).to(seq.device)
            for start in range(0, seq.shape[0], train.micro_batch_size):
                idx = order[start : start + train.micro_batch_size]
                logits = self.actor(seq[idx], attention_mask=attention[idx])
                logp = response_slice(token_logprobs(logits, seq[idx], ppo.temperature), exp.samples)
                policy_loss, clip_fraction, approx_kl = clipped_policy_loss(
                    logp, exp.old_logprobs[idx], exp.advantages[idx], mask[idx], ppo.clip_range)
                entropy = masked_mean(response_slice(entropy_from_logits(logits[:, :-1].float() / ppo.temperature),
                                                     exp.samples), mask[idx])
                self.actor.backward(policy_loss)
                self.actor.step()
                values = response_slice(self.critic(seq[idx], attention_mask=attention[idx])[:, :-1], exp.samples)
                value_loss = clipped_value_loss(values, exp.old_values[idx], exp.returns[idx], mask[idx], ppo.value_clip_range)
                self.critic.backward(value_loss)
                self.critic.step()
                stats = {"policy_loss": policy_loss.detach(), "value_loss": value_loss.detach(),
                         "clip_fraction": clip_fraction, "approx_kl": approx_kl, "entropy": entropy.detach()}
                for key, value in stats.items():
                    sums[key] = sums.get(key, 0.0) + value.float()
                count += 1
        return {k: v / count for k, v in sums.items()}

    def run(self) -> dict[str, Any]:
        return run_rollout_iterations(self, "ppo", self._iteration)

    def _iteration(self) -> tuple[dict[str, float], dict[str, Any]]:
        clock = time.perf_counter()
        exp = self.rollout()
        rollout_seconds = time.perf_counter() - clock
        stats = {**experience_stats(exp), **self.update(exp)}
        if self.monitor is not None:
            prompts, responses = decode(self.tokenizer, exp.samples)
            stats["monitor"] = call_reward_function(self.monitor, prompts, responses, self.info.device).mean()
        record = mean_over_ranks(stats)
        kl_coef = self.kl.coef
        self.kl.update(record["kl"], self.config.ppo.rollout_batch_size * self.info.world_size)
        return record, {"kl_coef": kl_coef, "critic_lr": float(self.critic.get_lr()[0]), "rollout_seconds": rollout_seconds}
