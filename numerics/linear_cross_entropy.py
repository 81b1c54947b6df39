"""The LM head and its cross-entropy in chunks of tokens (`model.loss_chunk_tokens`).

The plain head computes logits for every token of the batch at once: [B*T, V] in bf16 plus an fp32
copy for the softmax (16 x 1024 tokens at a 32,000 vocabulary: 1 GB + 2 GB), kept until the
backward. Here the head's logits exist for one chunk of tokens at a time: for each chunk the
forward computes the logits, the loss and, right away, the gradients of the mean loss with respect
to the hidden states and the head's weight (softmax minus one-hot, through the same two matmuls the
backward would run), so nothing of the chunk is kept. The backward only scales the gradients it was
handed. Same flops as the plain head (three matmuls); memory for logits of one chunk.

It gives the mean over all tokens of the per-token loss (0 at `ignore_index`, counted in the mean),
what `Transformer.forward` returns with the plain head: the same numbers to fp32 rounding.
"""
from __future__ import annotations

import torch


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int,
                ignore_index: int) -> torch.Tensor:
        count = hidden.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start in range(0, count, chunk_tokens):
            h = hidden[start : start + chunk_tokens]
            t = targets[start : start + chunk_tokens]
            logits = (h @ weight.t()).float()  # bf16 matmul under autocast, softmax in fp32
            real = t != ignore_index
            safe = torch.where(real, t, 0)[:, None]
            lse = torch.logsumexp(logits, dim=-1)
            total = total + torch.where(real, lse - logits.gather(1, safe)[:, 0], 0.0).sum()
            grad = torch.exp(logits - lse[:, None]).scatter_add(1, safe, -torch.ones_like(safe, dtype=logits.dtype))
            grad = (grad * (real[:, None] / count)).to(h.dtype)  # d(mean loss)/d(logits)
            grad_hidden[start : start + chunk_tokens] = grad @ weight.to(grad.dtype)
            grad_weight += (grad.t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return total / count

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss.to(grad_hidden.dtype), grad_weight * grad_loss.to(grad_weight.dtype), None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int,
                         ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `targets` (hidden [..., d], weight [V, d],
    targets [...]), computed `chunk_tokens` tokens at a time."""
    return _ChunkedLinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1),
                                            chunk_tokens, ignore_index)
