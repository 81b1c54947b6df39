"""Scoring rollouts for PPO and GRPO: a reward function on the decoded text, or a frozen reward model."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from posttrain.frozen_models import build_frozen
from posttrain.heads import ScalarHeadModel
from posttrain.job import load_weights, starting_state
from posttrain.reward_functions import call_reward_function, resolve_reward_function
from posttrain.rollout import Samples, score_with_model
from pretrain import checkpoint


def reward_module(run: Path, model_config: Any) -> ScalarHeadModel:
    """The reward run's latest weights in a ScalarHeadModel (PPO's critic may start from it too)."""
    module = ScalarHeadModel(model_config)
    state, tag = starting_state(run, None)
    load_weights(module, state, str(checkpoint.checkpoints_dir(run) / tag))
    return module


def decode(tokenizer, samples: Samples) -> tuple[list[str], list[str]]:
    """Prompts and responses as text (a response's closing EOD dropped), what reward functions read."""
    eod = tokenizer.eod_id
    prompts = [tokenizer.decode(p) for p in samples.prompts()]
    responses = [tokenizer.decode(r[:-1] if r and r[-1] == eod else r) for r in samples.responses()]
    return prompts, responses


class Scorer:
    """score(samples) -> one fp32 reward per row [B]."""

    def __init__(self, tokenizer, device: torch.device, reward_function: str | None, key: str,
                 reward_run: Path | None = None, reward_config: Any = None, ds_config: dict | None = None,
                 frozen_mode: str = "auto"):
        self.tokenizer, self.device = tokenizer, device
        self.function = resolve_reward_function(reward_function, key) if reward_function else None
        self.model = None
        if reward_run is not None:
            self.model = build_frozen(reward_module(reward_run, reward_config), ds_config, frozen_mode, device)

    def __call__(self, samples: Samples) -> torch.Tensor:
        if self.model is not None:
            return score_with_model(self.model, samples, self.tokenizer.eod_id, self.tokenizer.pad_id)
        return call_reward_function(self.function, *decode(self.tokenizer, samples), self.device)
