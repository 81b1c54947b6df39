"""Attention within the documents of a packed row (segment_ids [B, T]): the mask, and which kernel takes it.

Two forms of one rule, "a query sees the keys of its own document at or before it":
- a dense boolean mask [B, 1, T, T] for torch's scaled_dot_product_attention: exact everywhere, but an
  arbitrary mask keeps SDPA off its flash kernel and costs O(T^2) memory per row;
- a FlexAttention BlockMask: per block of 128 x 128 (query, key) positions, whether it is empty, full or
  partial, so the kernel skips every block across documents or above the diagonal and evaluates the
  mask only inside partial ones.

Which one is used is `model.document_attention` (pretrain.model.ModelConfig): `auto` takes FlexAttention
on CUDA (compiled: eager FlexAttention materialises the full score matrix) and the dense mask elsewhere.
torch has no FlexAttention backward on CPU, so `flex` on CPU is for inference and reference checks.

Under torch.compile: with the whole model compiled the BlockMask is built inside the graph from
segment_ids (a graph input, so a new document layout does not recompile); with each block compiled
(train.compile_scope = blocks) it is built once per forward by a compiled create_block_mask and passed
to every block. Neither breaks the graph (tests/pretrain/test_document_attention.py).
"""
from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import BlockMask, and_masks, create_block_mask, flex_attention


def uses_flex(choice: str, device: torch.device, dropout: float) -> bool:
    """Whether document masking runs on FlexAttention: `choice` is model.document_attention."""
    if choice == "auto":
        return device.type == "cuda" and dropout == 0.0  # FlexAttention has no attention dropout
    return choice == "flex"


def document_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] position of each token within its document (0 where a new segment id begins)."""
    index = torch.arange(segment_ids.shape[1], device=segment_ids.device)
    first = torch.ones_like(segment_ids[:, :1], dtype=torch.bool)
    begins = torch.cat([first, segment_ids[:, 1:] != segment_ids[:, :-1]], dim=1)
    return index - torch.where(begins, index, 0).cummax(-1).values


def dense_document_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Boolean [B, 1, T, T]: true where query i may attend to key j (j <= i, same segment id)."""
    index = torch.arange(segment_ids.shape[1], device=segment_ids.device)
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return ((index[None, :] <= index[:, None]) & same)[:, None]


def document_block_mask(segment_ids: torch.Tensor) -> BlockMask:
    """The same rule as dense_document_mask as a FlexAttention BlockMask (one for all heads)."""

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    def same_document(b, h, q_idx, kv_idx):
        return segment_ids[b, q_idx] == segment_ids[b, kv_idx]

    B, T = segment_ids.shape
    build = create_block_mask if _eager_is_right(segment_ids) else _compiled(create_block_mask)
    return build(and_masks(causal, same_document), B, None, T, T, device=segment_ids.device)


def document_mask(segment_ids: torch.Tensor, choice: str, dropout: float) -> torch.Tensor | BlockMask:
    """The mask the attention core takes for packed documents: a BlockMask (FlexAttention) or a dense one (SDPA)."""
    if uses_flex(choice, segment_ids.device, dropout):
        return document_block_mask(segment_ids)
    return dense_document_mask(segment_ids)


def flex_document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask) -> torch.Tensor:
    """FlexAttention on [B, heads, T, head_dim]; fewer kv heads than query heads is grouped-query attention."""
    attend = flex_attention if _eager_is_right(q) else _compiled(flex_attention)
    return attend(q, k, v, block_mask=block_mask, enable_gqa=k.shape[1] != q.shape[1])


def _eager_is_right(x: torch.Tensor) -> bool:
    # Inside a compiled model dynamo traces the plain function into the graph; off CUDA the eager
    # function is the reference. A model that is not compiled still gets fused kernels on CUDA.
    return torch.compiler.is_compiling() or x.device.type != "cuda"


@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=False)
