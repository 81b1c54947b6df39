"""PPO's experience: sample responses with the KV cache, then score them token by token.

Prompts of different lengths share a batch left-padded with EOD, and every forward passes
Samples.attention_mask: padding is never attended to and positions start at each prompt's first
real token, so a padded row computes exactly what it would alone. Every sequence is
[EOD-padded prompt | response | pad], the prompt block P ids wide; response token j sits at
position P + j and is predicted at position P - 1 + j. (Padding after a response is never read by
the response's tokens: attention is causal.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from lmforge import distributed
from posttrain.heads import last_token_scores
from posttrain.losses import gae, masked_mean, masked_whiten, token_logprobs
from pretrain.model import KVCache, ModelConfig
from pretrain.sampling import filter_logits


def left_padding_mask(width: int, prompt_width: int, prompt_lengths: torch.Tensor) -> torch.Tensor:
    """[B, width], true from each row's first real prompt token on (prompts right-aligned in prompt_width)."""
    columns = torch.arange(width, device=prompt_lengths.device)[None, :]
    return columns >= (prompt_width - prompt_lengths)[:, None]


@dataclass(frozen=True)
class Samples:
    """sequences [B, P + R]; the prompt block is P wide; lengths [B] response ids (EOD included)."""

    sequences: torch.Tensor
    prompt_width: int
    prompt_lengths: torch.Tensor
    lengths: torch.Tensor

    @property
    def response_mask(self) -> torch.Tensor:
        width = self.sequences.shape[1] - self.prompt_width
        return torch.arange(width, device=self.sequences.device)[None, :] < self.lengths[:, None]

    @property
    def attention_mask(self) -> torch.Tensor:
        """[B, P + R], false at the left padding of each prompt."""
        return left_padding_mask(self.sequences.shape[1], self.prompt_width, self.prompt_lengths)

    def responses(self) -> list[list[int]]:
        return [row[self.prompt_width : self.prompt_width + n] for row, n in zip(self.sequences.tolist(), self.lengths.tolist())]

    def prompts(self) -> list[list[int]]:
        return [row[self.prompt_width - n : self.prompt_width] for row, n in zip(self.sequences.tolist(), self.prompt_lengths.tolist())]


def rollout_generator(seed: int, step: int, rank: int, salt: int) -> torch.Generator:
    """The CPU generator of one rank's sampling (salt 0) or minibatch order (salt 1 + epoch) at `step`: resumes reproduce it."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + rank * 104_729 + salt) % 2**63)


def everyone_done(done: torch.Tensor) -> bool:
    """True when every rank's rows are finished: ranks stop together (ZeRO-3 forwards are collective)."""
    return float(distributed.all_reduce_mean(done.all().float())) == 1.0


@torch.no_grad()
def sample(model, config: ModelConfig, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_k: int,
           eod_id: int, pad_id: int, generator: torch.Generator, device: torch.device, dtype: torch.dtype) -> Samples:
    """Samples up to max_new_tokens per prompt (a row stops after its EOD) with a KV cache."""
    width = max(len(p) for p in prompts)
    batch = len(prompts)
    sequences = torch.full((batch, width + max_new_tokens), pad_id, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        sequences[i, :width] = torch.tensor([eod_id] * (width - len(p)) + p, dtype=torch.long)
    prompt_lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=device)
    mask = left_padding_mask(width + max_new_tokens, width, prompt_lengths)
    cache = KVCache(config, batch, width + max_new_tokens, device, dtype)
    logits = model(sequences[:, :width], cache=cache, attention_mask=mask[:, :width])[:, -1]
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    lengths = torch.zeros(batch, dtype=torch.long, device=device)
    steps = 0
    for t in range(max_new_tokens):
        probs = filter_logits(logits.float() / temperature, top_k, 1.0).softmax(-1)
        token = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(device)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        sequences[:, width + t] = token
        lengths += (~done).long()
        done |= token == eod_id
        steps = t + 1
        if t + 1 == max_new_tokens or everyone_done(done):
            break
        logits = model(token[:, None], cache=cache, attention_mask=mask[:, : width + t + 1])[:, -1]
    return Samples(sequences[:, : width + steps], width, prompt_lengths, lengths)


def reward_model_inputs(samples: Samples, eod_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded prompt + response (+ EOD where the response was cut short), as the reward model was trained."""
    rows = []
    for prompt, response in zip(samples.prompts(), samples.responses()):
        rows.append(prompt + response + ([] if response and response[-1] == eod_id else [eod_id]))
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r)
    device = samples.sequences.device
    return tokens.to(device), torch.tensor([len(r) for r in rows], dtype=torch.long, device=device)


def score_with_model(reward_model, samples: Samples, eod_id: int, pad_id: int) -> torch.Tensor:
    tokens, lengths = reward_model_inputs(samples, eod_id, pad_id)
    return last_token_scores(reward_model(tokens), lengths).float()


@dataclass(frozen=True)
class Experience:
    """One rollout batch, everything aligned with the response tokens [B, R]."""

    samples: Samples
    mask: torch.Tensor
    old_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    scores: torch.Tensor
    """The raw reward of each response [B] (before whitening and clipping)."""
    kl: torch.Tensor
    """Per-sequence sum of log π_old - log π_ref over the response [B]."""


def response_slice(per_position: torch.Tensor, samples: Samples) -> torch.Tensor:
    """[B, P+R-1] next-token quantities (predicted at positions 0..) -> the response part [B, R]."""
    return per_position[:, samples.prompt_width - 1 :]


def policy_logprobs(model, samples: Samples, temperature: float, rows: torch.Tensor | None = None) -> torch.Tensor:
    """log π(response token) [B, R] of `model` (an engine or a module), optionally for some rows only."""
    seq, attention = samples.sequences, samples.attention_mask
    if rows is not None:
        seq, attention = seq[rows], attention[rows]
    return response_slice(token_logprobs(model(seq, attention_mask=attention), seq, temperature), samples)


@torch.no_grad()
def make_experience(samples: Samples, actor, critic, reference, score: Callable[[Samples], torch.Tensor],
                    normalise: Callable[[torch.Tensor], torch.Tensor], kl_coef: float, temperature: float,
                    gamma: float, lam: float) -> Experience:
    """Log-probabilities, values, KL-penalised per-token rewards, GAE advantages and returns."""
    seq, attention = samples.sequences, samples.attention_mask
    mask = samples.response_mask
    old_logprobs = policy_logprobs(actor, samples, temperature) * mask
    ref_logprobs = policy_logprobs(reference, samples, temperature) * mask
    old_values = response_slice(critic(seq, attention_mask=attention)[:, :-1].float(), samples) * mask
    scores = score(samples)
    token_kl = (old_logprobs - ref_logprobs) * mask
    rewards = -kl_coef * token_kl
    last = (samples.lengths - 1).clamp(min=0)
    rewards[torch.arange(len(last), device=seq.device), last] += normalise(scores) * (samples.lengths > 0)
    advantages, returns = gae(rewards, old_values, mask, gamma, lam)
    advantages = masked_whiten(advantages, mask)
    return Experience(samples, mask, old_logprobs, ref_logprobs, old_values, advantages, returns, scores,
                      token_kl.sum(-1))


def experience_stats(exp: Experience) -> dict[str, torch.Tensor]:
    return {
        "reward": exp.scores.mean(),
        "kl": exp.kl.mean(),
        "response_length": exp.samples.lengths.float().mean(),
        "value_mean": masked_mean(exp.old_values, exp.mask),
        "return_mean": masked_mean(exp.returns, exp.mask),
    }
