"""A scalar head on the LM trunk: the reward model (score at the last real token) and the PPO critic (a value per token)."""
from __future__ import annotations

import torch
import torch.nn as nn

from pretrain.model import ModelConfig, Transformer


class ScalarHeadModel(nn.Module):
    """forward(tokens[B, T]) -> one fp32 scalar per position [B, T], from the final-normed hidden states.

    The LM head is not used; where it is not tied to the embedding it is frozen, so no optimizer or
    ZeRO stage waits for its (absent) gradient. The checkpoint keys are `lm.*` and `head.*`.
    """

    trainable_with_lora = ("head.",)
    """Under LoRA (posttrain.lora.add_lora) the scalar head trains with the adapters: it starts at zero."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.lm = Transformer(config)
        self.head = nn.Linear(config.d_model, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        if not config.tied:
            self.lm.lm_head.weight.requires_grad_(False)

    @property
    def config(self) -> ModelConfig:
        return self.lm.config

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.lm.hidden_states(tokens, attention_mask=attention_mask)).squeeze(-1).float()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def last_token_scores(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """values [B, T], lengths [B] of right-padded rows -> the value at each row's last real token [B]."""
    return values.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
