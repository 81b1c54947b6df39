"""Autoregressive sampling with a KV cache: temperature, top-k and top-p (nucleus)."""
from __future__ import annotations

import torch

from pretrain.model import KVCache, Transformer


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Sets logits outside the top-k / top-p set to -inf (each row independently)."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


@torch.no_grad()
def generate(
    model: Transformer,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_token: int | None = None,
    generator: torch.Generator | None = None,
    prompt_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """prompt [B, T] -> new tokens [B, <= max_new_tokens]; temperature 0 is greedy.

    prompt_mask [B, T] (true at real tokens) lets prompts of different lengths share a batch left-padded.
    """
    max_new_tokens = min(max_new_tokens, model.config.max_seq_len - prompt.shape[1])
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.config, prompt.shape[0], prompt.shape[1] + max_new_tokens, prompt.device, dtype)
    mask = None
    if prompt_mask is not None:
        mask = torch.ones(prompt.shape[0], prompt.shape[1] + max_new_tokens, dtype=torch.bool, device=prompt.device)
        mask[:, : prompt.shape[1]] = prompt_mask.bool()
    logits = model(prompt, cache=cache, attention_mask=None if mask is None else mask[:, : prompt.shape[1]])[:, -1]
    out = []
    finished = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    for _ in range(max_new_tokens):
        if temperature <= 0:
            token = logits.argmax(-1)
        else:
            probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        out.append(token)
        if stop_token is not None:
            finished |= token == stop_token
            if bool(finished.all()):
                break
        seen = None if mask is None else mask[:, : cache.length + 1]
        logits = model(token[:, None], cache=cache, attention_mask=seen)[:, -1]
    return torch.stack(out, dim=1) if out else prompt.new_zeros((prompt.shape[0], 0))
