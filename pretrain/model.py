"""GPT-2 and Llama decoder-only transformers in plain PyTorch (no distributed code here).

Read top to bottom in the order data flows: config, norms and rotary embedding, attention, MLP,
block, the model, then the properties that belong to it (parameter count, flops per token).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask

from numerics.document_attention import document_mask, document_positions, flex_document_attention
from numerics.linear_cross_entropy import linear_cross_entropy


@dataclass(frozen=True)
class ModelConfig:
    arch: Literal["gpt2", "llama"] = "llama"
    """gpt2: learned positions, LayerNorm, GELU MLP, tied head; llama: RoPE, RMSNorm, SwiGLU, GQA."""
    vocab_size: int | None = None
    """Tokenizer vocabulary; null takes it from the training data's tokenizer."""
    pad_vocab_to_multiple: int = 128
    """The embedding table is padded to a multiple of this (tensor-core friendly shapes)."""
    n_layers: int = 2
    """Transformer blocks."""
    n_heads: int = 4
    """Attention (query) heads."""
    n_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; null means n_heads (plain multi-head)."""
    d_model: int = 64
    """Residual stream width."""
    d_ff: int | None = None
    """MLP hidden width; null means 4*d_model (gpt2) or 8/3*d_model rounded up to 64 (llama)."""
    max_seq_len: int = 256
    """Longest sequence the model accepts (size of the position table / RoPE cache)."""
    rope_theta: float = 10000.0
    """RoPE base frequency (llama)."""
    norm_eps: float = 1e-5
    """Epsilon of LayerNorm / RMSNorm."""
    tie_embeddings: bool | None = None
    """Share the input embedding with the output head; null means true for gpt2, false for llama."""
    bias: bool | None = None
    """Biases in linear layers and norms; null means true for gpt2, false for llama."""
    dropout: float = 0.0
    """Dropout on attention output and MLP output (0 for pretraining at scale)."""
    init_std: float = 0.02
    """Standard deviation of the normal init; residual projections get it / sqrt(2 * n_layers)."""
    n_experts: int = 0
    """Mixture of experts: SwiGLU experts per block (Mixtral); 0 means a dense MLP."""
    experts_per_token: int = 2
    """Experts each token is routed to (top-k of the router's softmax, weights renormalised)."""
    router_aux_loss_coef: float = 0.01
    """Weight of the load-balancing loss (Mixtral's, mean over MoE blocks) added to the training loss."""
    document_attention: Literal["auto", "flex", "sdpa"] = "auto"
    """Kernel for packed documents (segment_ids): flex (FlexAttention, blocks across documents skipped), sdpa (a dense T x T mask); auto: flex on CUDA without dropout, else sdpa."""
    loss_chunk_tokens: int = 0
    """Tokens per chunk of the LM head + cross-entropy in training (numerics/linear_cross_entropy.py): logits of one
    chunk at a time, never of the whole batch; 0: the plain head (docs/performance.md has both measured)."""

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        if self.arch == "gpt2":
            return 4 * self.d_model
        return 64 * math.ceil(8 * self.d_model / 3 / 64)

    @property
    def tied(self) -> bool:
        return self.arch == "gpt2" if self.tie_embeddings is None else self.tie_embeddings

    @property
    def use_bias(self) -> bool:
        return self.arch == "gpt2" if self.bias is None else self.bias

    @property
    def padded_vocab_size(self) -> int:
        assert self.vocab_size, "vocab_size must be resolved before the model is built"
        m = self.pad_vocab_to_multiple
        return m * math.ceil(self.vocab_size / m)

    def problems(self) -> list[str]:
        found = []
        if self.d_model % self.n_heads:
            found.append(f"model.d_model = {self.d_model}: must be divisible by model.n_heads = {self.n_heads}")
        if self.n_heads % self.kv_heads:
            found.append(f"model.n_kv_heads = {self.n_kv_heads}: must divide model.n_heads = {self.n_heads}")
        if self.arch == "llama" and (self.d_model // max(self.n_heads, 1)) % 2:
            found.append(f"model.d_model / model.n_heads = {self.head_dim}: RoPE needs an even head dimension")
        for key in ("n_layers", "n_heads", "d_model", "max_seq_len", "pad_vocab_to_multiple"):
            if getattr(self, key) < 1:
                found.append(f"model.{key} = {getattr(self, key)}: must be at least 1")
        if self.vocab_size is not None and self.vocab_size < 2:
            found.append(f"model.vocab_size = {self.vocab_size}: must be at least 2 (or null for the data's)")
        if self.n_experts < 0 or self.n_experts == 1:
            found.append(f"model.n_experts = {self.n_experts}: must be 0 (dense) or at least 2")
        if self.n_experts and self.arch != "llama":
            found.append(f"model.n_experts = {self.n_experts}: mixture of experts needs model.arch = llama (SwiGLU experts)")
        if self.n_experts and not 1 <= self.experts_per_token <= self.n_experts:
            found.append(f"model.experts_per_token = {self.experts_per_token}: must be in [1, model.n_experts = {self.n_experts}]")
        if self.router_aux_loss_coef < 0:
            found.append(f"model.router_aux_loss_coef = {self.router_aux_loss_coef}: must be at least 0")
        if not 0.0 <= self.dropout < 1.0:
            found.append(f"model.dropout = {self.dropout}: must be in [0, 1)")
        if self.loss_chunk_tokens < 0:
            found.append(f"model.loss_chunk_tokens = {self.loss_chunk_tokens}: must be 0 (the plain head) or a number of tokens")
        if self.document_attention == "flex" and self.dropout:
            found.append(f"model.document_attention = flex: FlexAttention has no attention dropout (model.dropout = {self.dropout}); "
                         "set model.dropout = 0 or model.document_attention = sdpa")
        return found

    def with_vocab(self, vocab_size: int) -> "ModelConfig":
        return replace(self, vocab_size=vocab_size)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 for stability under bf16, as Llama does.
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def make_norm(config: ModelConfig) -> nn.Module:
    if config.arch == "llama":
        return RMSNorm(config.d_model, config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.use_bias)


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_seq_len, head_dim] in the rotate-half layout HF's Llama uses."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D]; cos/sin: [T, D], or [B, 1, T, D] for per-row positions."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).type_as(x)


class KVCache:
    """Preallocated keys/values per layer for incremental decoding."""

    def __init__(self, config: ModelConfig, batch: int, max_len: int, device, dtype):
        shape = (batch, config.kv_heads, max_len, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k.shape[2]
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class AttentionCore(nn.Module):
    """softmax(q kᵀ / √d) v on [B, heads, T, head_dim]; each kv head serves a group of query heads (GQA).

    Its own module so that parallelism applied from outside (parallel/sequence.py) can swap it;
    group sizes come from the tensors, so it works on any rank's share of the heads.
    """

    def forward(self, q, k, v, mask: torch.Tensor | BlockMask | None, is_causal: bool, dropout_p: float) -> torch.Tensor:
        if isinstance(mask, BlockMask):  # packed documents on FlexAttention (numerics/document_attention.py)
            return flex_document_attention(q, k, v, mask)
        if k.shape[1] != q.shape[1]:  # grouped-query attention: share each kv head across a group
            repeat = q.shape[1] // k.shape[1]
            k = k.repeat_interleave(repeat, dim=1)
            v = v.repeat_interleave(repeat, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.config, self.layer = config, layer
        hd, bias = config.head_dim, config.use_bias
        self.q_proj = nn.Linear(config.d_model, config.n_heads * hd, bias=bias)
        self.k_proj = nn.Linear(config.d_model, config.kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(config.d_model, config.kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(config.n_heads * hd, config.d_model, bias=bias)
        self.o_proj.residual_projection = True
        self.dropout = config.dropout
        self.core = AttentionCore()

    def forward(self, x, rope, cache: KVCache | None = None, mask: torch.Tensor | BlockMask | None = None) -> torch.Tensor:
        """mask: None (causal), a boolean [B, 1, T, keys] of what each query may attend to, or a BlockMask."""
        B, T, _ = x.shape
        c = self.config
        # Head counts come from the tensors: a tensor-parallel rank holds n_heads / tensor of them.
        q = self.q_proj(x).view(B, T, -1, c.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, -1, c.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, -1, c.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        causal = True
        if cache is not None:
            causal = cache.length == 0  # a prefill is causal; one new token attends to all before it
            k, v = cache.update(self.layer, k, v)
        y = self.core(q, k, v, mask, mask is None and causal and T > 1, self.dropout if self.training else 0.0)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.swiglu = config.arch == "llama"
        d, h, bias = config.d_model, config.hidden_dim, config.use_bias
        self.up_proj = nn.Linear(d, h, bias=bias)
        if self.swiglu:
            self.gate_proj = nn.Linear(d, h, bias=bias)
        self.down_proj = nn.Linear(h, d, bias=bias)
        self.down_proj.residual_projection = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            hidden = F.silu(self.gate_proj(x)) * self.up_proj(x)
        else:
            hidden = F.gelu(self.up_proj(x), approximate="tanh")
        return self.dropout(self.down_proj(hidden))


class MoEMLP(nn.Module):
    """Mixtral's sparse block: a router picks experts_per_token SwiGLU experts per token.

    Routing: softmax over all experts in fp32, top-k, the k weights renormalised to sum to 1; no
    token is dropped (no capacity limit). After each forward `aux_loss` holds Mixtral's
    load-balancing loss (n_experts * sum_e tokens_fraction_e * mean_prob_e; k when balanced) and
    `expert_load` the tokens each expert received [n_experts] (for metrics).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = config.n_experts, config.experts_per_token
        self.router = nn.Linear(config.d_model, config.n_experts, bias=False)
        self.experts = nn.ModuleList(MLP(config) for _ in range(config.n_experts))
        self.aux_loss: torch.Tensor | None = None
        self.expert_load: torch.Tensor | None = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, d] -> (router probabilities [N, E] fp32, chosen experts [N, k], their weights [N, k])."""
        probs = F.softmax(self.router(x).float(), dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        return probs, chosen, weights / weights.sum(-1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        probs, chosen, weights = self.route(flat)
        # Group the (token, slot) routes by expert: one host read of the per-expert counts per block.
        order = chosen.reshape(-1).argsort(stable=True)
        counts = torch.bincount(chosen.reshape(-1), minlength=self.n_experts).tolist()
        out = torch.zeros_like(flat)
        for expert, routes in zip(self.experts, order.split(counts)):
            if routes.numel():
                token = routes // self.top_k
                out.index_add_(0, token, expert(flat[token]) * weights.reshape(-1)[routes, None].to(flat.dtype))
        self.aux_loss, self.expert_load = load_balancing_loss(probs, chosen)
        return out.view_as(x)


def load_balancing_loss(probs: torch.Tensor, chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral's auxiliary loss of one block (HF load_balancing_loss_func for one layer) and the
    tokens per expert: probs [N, E], chosen [N, k] -> (scalar, counts [E])."""
    n_experts = probs.shape[-1]
    counts = F.one_hot(chosen, n_experts).sum(dim=(0, 1)).to(probs.dtype)
    loss = n_experts * (counts / chosen.shape[0] * probs.mean(0)).sum()
    return loss, counts.detach()


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = Attention(config, layer)
        self.mlp_norm = make_norm(config)
        self.mlp = MoEMLP(config) if config.n_experts else MLP(config)

    def forward(self, x, rope, cache: KVCache | None = None, mask: torch.Tensor | BlockMask | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope, cache, mask)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """forward(tokens[B, T], targets[B, T] | None) -> mean loss (with targets) or logits [B, T, V].

    attention_mask (optional, [B, T] or [B, cache length + T], true at real tokens) makes padding inert;
    segment_ids (optional, [B, T]) keeps packed examples apart.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        assert not config.problems(), config.problems()
        self.config = config
        V = config.padded_vocab_size
        self.embed = nn.Embedding(V, config.d_model)
        self.pos_embed = nn.Embedding(config.max_seq_len, config.d_model) if config.arch == "gpt2" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.final_norm = make_norm(config)
        self.lm_head = nn.Linear(config.d_model, V, bias=False)
        if config.tied:
            self.lm_head.weight = self.embed.weight  # weight tying: one matrix reads and writes tokens
        if config.arch == "llama":
            cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            if getattr(module, "residual_projection", False):  # GPT-2: keep the residual stream's variance flat
                std = std / math.sqrt(2 * self.config.n_layers)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)

    def _rope(self, start: int, length: int, positions: torch.Tensor | None = None):
        if self.pos_embed is not None:
            return None
        if positions is None:
            return self.rope_cos[start : start + length], self.rope_sin[start : start + length]
        return self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]  # per-row positions [B, 1, T, D]

    def hidden_states(self, tokens: torch.Tensor, cache: KVCache | None = None,
                      attention_mask: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None,
                      position_offset: int = 0) -> torch.Tensor:
        """Final-normed hidden states [B, T, d_model] (the input of the LM head and of value/reward heads).

        attention_mask [B, cache length + T], true at real tokens: padding is never attended to and
        positions count real tokens only, so a left-padded row computes what it would unpadded.
        segment_ids [B, T] (no cache): packed examples, each a run of one id, attend only within
        themselves and their positions restart, so a packed row computes what each example would alone.
        position_offset (no cache): the position of tokens[:, 0] in its sequence, for a rank that holds a
        slice of it (sequence parallelism).
        """
        start = cache.length if cache is not None else position_offset
        T = tokens.shape[1]
        positions, mask = None, None
        if segment_ids is not None:  # a dense [B, 1, T, T] mask or a FlexAttention BlockMask (model.document_attention)
            positions = document_positions(segment_ids)
            mask = document_mask(segment_ids, self.config.document_attention, self.config.dropout)
        if attention_mask is not None:
            real = attention_mask.bool()
            positions = (real.long().cumsum(-1) - 1).clamp(min=0)[:, start : start + T]
            keys = torch.arange(start + T, device=tokens.device)
            queries = keys[start:, None]
            # A padding query may see itself, so no row is fully masked (its output is never read).
            mask = ((keys <= queries) & (real[:, None, :] | (keys == queries)))[:, None]  # [B, 1, T, keys]
        x = self.embed(tokens)
        if self.pos_embed is not None:
            x = x + self.pos_embed(torch.arange(start, start + T, device=tokens.device) if positions is None else positions)
        x = self.drop(x)
        rope = self._rope(start, T, positions)
        for block in self.blocks:
            x = block(x, rope, cache, mask)
        if cache is not None:
            cache.length += T
        return self.final_norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the real vocabulary (padding columns dropped)."""
        return self.lm_head(hidden)[..., : self.config.vocab_size]

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None,
                attention_mask: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None,
                position_offset: int = 0):
        hidden = self.hidden_states(tokens, cache, attention_mask, segment_ids, position_offset)
        if targets is None:
            return self.logits(hidden)
        loss = self.head_loss(hidden, targets)
        if self.config.n_experts and self.config.router_aux_loss_coef:
            loss = loss + self.config.router_aux_loss_coef * self.router_aux_loss()
        return loss

    def head_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the LM head's logits of `hidden` against `targets`."""
        if self.config.loss_chunk_tokens:
            return linear_cross_entropy(hidden, self.lm_head.weight, targets, self.config.loss_chunk_tokens)
        return token_cross_entropy(self.lm_head(hidden), targets).mean()

    def router_aux_loss(self) -> torch.Tensor:
        """Mean over MoE blocks of the load-balancing loss of the last forward (HF's Mixtral takes it
        over all layers' tokens at once; a per-block mean is what DeepSpeed's MoE layers give)."""
        losses = [block.mlp.aux_loss for block in self.blocks if getattr(block.mlp, "aux_loss", None) is not None]
        return torch.stack(losses).mean()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def active_params(self) -> int:
        """Parameters one token uses: all but the experts it is not routed to."""
        c = self.config
        if not c.n_experts:
            return self.num_params()
        expert = 3 * c.d_model * c.hidden_dim + (2 * c.hidden_dim + c.d_model if c.use_bias else 0)
        return self.num_params() - c.n_layers * (c.n_experts - c.experts_per_token) * expert

    def flops_per_token(self, seq_len: int) -> float:
        return flops_per_token(self.config, seq_len)


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Per-token loss [B, T] in fp32 (0 where targets == ignore_index)."""
    flat = F.cross_entropy(
        logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index, reduction="none"
    )
    return flat.view(targets.shape)


def matmul_params(config: ModelConfig) -> int:
    """Parameters that take part in matrix products per token (no embedding lookups, no norms);
    with experts, the active ones: the router and experts_per_token experts per block."""
    d, h, hd = config.d_model, config.hidden_dim, config.head_dim
    attn = d * config.n_heads * hd * 2 + d * config.kv_heads * hd * 2
    mlp = d * h * (3 if config.arch == "llama" else 2)
    if config.n_experts:
        mlp = mlp * config.experts_per_token + d * config.n_experts
    return config.n_layers * (attn + mlp) + d * config.padded_vocab_size


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training flops per token: 6N for the matmuls forward+backward plus 12*L*d*T for attention."""
    return 6 * matmul_params(config) + 12 * config.n_layers * config.d_model * seq_len
