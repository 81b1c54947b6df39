"""Programmatic rewards for PPO and GRPO (`ppo.reward_function`, `grpo.reward_function`).

A reward function takes the prompts and the responses (decoded text, without the closing EOD) and
returns one float per response. Built-in names: `digit_fraction` (share of the response's
non-space characters that are digits; the tests' target) and `python_syntax` (1 when the prompt's
code plus the response's complete lines parse, see posttrain/pysyntax.py). Any other value is
imported as `module:function`.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Callable, Sequence

import torch

from lmforge.errors import LmforgeError

RewardFunction = Callable[[Sequence[str], Sequence[str]], list[float]]


def digit_fraction(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """Share of each response's non-whitespace characters that are ASCII digits (0 when empty)."""
    scores = []
    for text in responses:
        chars = [c for c in text if not c.isspace()]
        scores.append(sum(c in "0123456789" for c in chars) / len(chars) if chars else 0.0)
    return scores


def python_syntax(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    from posttrain.pysyntax import completion_is_valid

    return [float(completion_is_valid(p, r)) for p, r in zip(prompts, responses)]


BUILTIN: dict[str, RewardFunction] = {"digit_fraction": digit_fraction, "python_syntax": python_syntax}


def resolve_reward_function(name: str, key: str = "ppo.reward_function") -> RewardFunction:
    """A built-in name or `module:function`; anything else is a one-line error naming `key`."""
    if name in BUILTIN:
        return BUILTIN[name]
    module_name, sep, attr = name.partition(":")
    if not sep:
        raise LmforgeError(f"{key} = {name!r}: expected one of {', '.join(BUILTIN)} or module:function")
    try:
        function = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise LmforgeError(f"{key} = {name!r}: cannot import it ({err})") from None
    if not callable(function):
        raise LmforgeError(f"{key} = {name!r}: not a function")
    try:
        inspect.signature(function).bind(["prompt"], ["response"])
    except TypeError as err:
        raise LmforgeError(f"{key} = {name!r}: cannot be called as {attr}(prompts, responses) ({err}); "
                           "expected a function of two lists of strings returning one float per response") from None
    except ValueError:  # a builtin without a signature: it will be called as it is
        pass
    return function


def call_reward_function(function: RewardFunction, prompts: Sequence[str], responses: Sequence[str],
                         device: torch.device) -> torch.Tensor:
    scores = list(function(prompts, responses))
    if len(scores) != len(responses):
        raise LmforgeError(f"reward function returned {len(scores)} scores for {len(responses)} responses")
    return torch.tensor([float(s) for s in scores], dtype=torch.float32, device=device)
