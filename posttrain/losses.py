"""The objectives of post-training, as pure tensor functions (no engines, no ranks).

SFT: cross-entropy on learned tokens only. Reward model: Bradley–Terry. DPO: Rafailov et al. 2023.
PPO: per-token KL-penalised rewards, GAE, clipped policy and value losses (Schulman et al. 2017;
Ouyang et al. 2022), with the adaptive KL coefficient of Ziegler et al. 2019. GRPO: group-relative
advantages and the clipped loss with a k3 KL term (Shao et al. 2024, DeepSeekMath; Dr. GRPO's
unscaled advantages, Liu et al. 2025).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from posttrain.batches import IGNORE_INDEX
from pretrain.model import token_cross_entropy


def sft_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the targets that are not IGNORE_INDEX (prompt and padding add nothing)."""
    per_token = token_cross_entropy(logits, targets, IGNORE_INDEX)
    return per_token.sum() / (targets != IGNORE_INDEX).sum().clamp(min=1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """logits [B, T, V] at positions 0..T-1 and tokens [B, T] -> log p(tokens[:, t+1]) [B, T-1], fp32."""
    return -token_cross_entropy(logits[:, :-1].float() / temperature, tokens[:, 1:])


def sequence_logprobs(logits: torch.Tensor, tokens: torch.Tensor, learned: torch.Tensor) -> torch.Tensor:
    """Sum of log-probabilities of the learned tokens of each row [B] (the response's log-likelihood)."""
    return (token_logprobs(logits, tokens) * learned[:, 1:].float()).sum(-1)


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """-log σ(r_chosen - r_rejected), per pair."""
    return -F.logsigmoid(chosen - rejected)


def dpo_loss(
    policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
    beta: float, label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO loss and the implicit rewards β·log(π/π_ref) of chosen and rejected responses."""
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    margin = chosen_reward - rejected_reward
    loss = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    return loss, chosen_reward.detach(), rejected_reward.detach()


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.float()
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries; masked-out entries become 0."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask.float()


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution at each position [B, T] (fp32)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation over response tokens [B, R] -> (advantages, returns).

    `mask` marks each row's response tokens (a prefix); the value after the last token is 0.
    """
    mask = mask.float()
    values, rewards = values * mask, rewards * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, advantages + values


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                        clip: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate (to minimise), the fraction of tokens clipped, and the approximate KL to the old policy."""
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = masked_mean((ratio - 1) - log_ratio, mask)  # k3 estimator, always >= 0
    return loss, clip_fraction.detach(), approx_kl.detach()


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       clip: float) -> torch.Tensor:
    """½·max((v - R)², (clip(v, v_old ± ε) - R)²), averaged over response tokens."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


class KLController:
    """The KL penalty coefficient: fixed, or adapted toward `target` (Ziegler et al. 2019)."""

    def __init__(self, coef: float, target: float | None, horizon: int):
        self.coef, self.target, self.horizon = coef, target, horizon

    def update(self, kl: float, rollouts: int) -> None:
        if self.target is None:
            return
        error = max(-0.2, min(0.2, kl / self.target - 1.0))
        self.coef *= 1.0 + error * rollouts / self.horizon


class RunningMoments:
    """Running mean and std of scores over every rank's rollouts (Chan et al.'s parallel update).

    `reduce_sum` sums a tensor over ranks (identity on one rank), so every rank holds the same moments.
    """

    def __init__(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor]):
        self.reduce_sum = reduce_sum
        self.mean, self.var, self.count = 0.0, 1.0, 0.0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double().flatten()
        stats = self.reduce_sum(torch.stack([x.new_tensor(float(x.numel())), x.sum(), (x**2).sum()]))
        n, total, squares = (float(v) for v in stats)
        if n == 0:
            return
        batch_mean = total / n
        batch_var = max(squares / n - batch_mean**2, 0.0)
        delta, combined = batch_mean - self.mean, self.count + n
        self.var = (self.var * self.count + batch_var * n + delta**2 * self.count * n / combined) / combined
        self.mean += delta * n / combined
        self.count = combined

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 1e-8))

    def state(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load(self, state: dict[str, float]) -> None:
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's advantage of each response [N]: its reward minus its group's mean, divided by the group's
    std (unbiased) + eps when `scale` (Dr. GRPO: scale=False). Groups are consecutive runs of group_size."""
    groups = rewards.float().view(-1, group_size)
    centred = groups - groups.mean(-1, keepdim=True)
    if scale:
        centred = centred / (groups.std(-1, keepdim=True) + eps)
    return centred.reshape(-1)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(π‖π_ref) from samples of π: exp(r) - r - 1 with r = log π_ref - log π (>= 0, unbiased)."""
    log_ratio = ref_logp - logp
    return log_ratio.exp() - log_ratio - 1


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, clip: float, kl_coef: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO's objective to minimise: per token -min(ρA, clip(ρ, 1±ε)A) + β·k3, averaged over each response's
    tokens, then over responses (DeepSeekMath eq. 3). logp/old_logp/ref_logp/mask [B, R]; advantages [B]."""
    ratio = (logp - old_logp).exp()
    a = advantages[:, None]
    surrogate = torch.minimum(ratio * a, ratio.clamp(1.0 - clip, 1.0 + clip) * a)
    kl = k3_kl(logp, ref_logp)
    per_token = -surrogate + kl_coef * kl
    m = mask.float()
    lengths = m.sum(-1).clamp(min=1)
    loss = ((per_token * m).sum(-1) / lengths).mean()
    stats = {"kl": ((kl * m).sum(-1) / lengths).mean().detach(),
             "clip_fraction": masked_mean(((ratio - 1).abs() > clip).float(), mask).detach()}
    return loss, stats
