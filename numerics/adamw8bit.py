"""`train.optimizer: adamw8bit`: bf16 weights and torchao's 8-bit AdamW, 6 bytes of state per parameter.

AdamW as the shipped JSONs run it keeps 16 bytes per parameter (fp32 weights, fp32 gradients, fp32
Adam moments): 208 GB for a 13B model, more than one H200 (141 GB) and its 128 GiB host hold
together once activations and buffers are counted. Here the weights and gradients are bf16 (2 + 2
bytes) and torchao's `AdamW8bit` keeps both moments in 8 bits with a scale per block of 256 values
(1 + 1 bytes; Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization"), updating the
bf16 weights with stochastic rounding (`bf16_stochastic_round`: each update rounds up or down with
the probability of its remainder, so small updates are not lost to bf16's 8-bit mantissa on average).
13B: 78 GB on the GPU, nothing offloaded.

DeepSpeed runs it as a client optimizer at ZeRO-0 (`ds_configs/zero0_adamw8bit.json`: no optimizer
section, no mixed precision: the weights already are bf16). torchao's moments are tensor subclasses
that DeepSpeed's checkpoint loader cannot unpickle (it loads with a callable map_location), so the
state dict this optimizer hands DeepSpeed holds their plain tensors (codes, scales, lookup table)
and is rebuilt on load: the checkpoint resumes exactly.
"""
from __future__ import annotations

import importlib
from typing import Any

import torch

PLAIN = "torchao_state"


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and hasattr(value, "__tensor_flatten__") and type(value) is not torch.Tensor:
        names, attributes = value.__tensor_flatten__()
        kind = type(value)
        return {PLAIN: f"{kind.__module__}:{kind.__qualname__}", "tensors": {n: getattr(value, n) for n in names},
                "attributes": list(attributes)}
    return value


def _rebuilt(value: Any, device: torch.device) -> Any:
    if isinstance(value, dict) and PLAIN in value:
        module, name = value[PLAIN].split(":")
        kind = getattr(importlib.import_module(module), name)
        tensors = {n: t.to(device) for n, t in value["tensors"].items()}
        return kind.__tensor_unflatten__(tensors, value["attributes"], None, None)
    return value.to(device) if isinstance(value, torch.Tensor) else value


def build_adamw8bit(param_groups: list[dict[str, Any]], lr: float, betas: tuple[float, float], eps: float, seed: int):
    """torchao's AdamW8bit over `param_groups` (each group's weight_decay kept), bf16 stochastic
    rounding on (its random numbers from `seed` and the step), with a state dict of plain tensors
    (see the module docstring)."""
    from torchao.optim import AdamW8bit

    class PlainStateAdamW8bit(AdamW8bit):
        def step(self, closure=None):
            # The rounding's random numbers are a function of (seed, step) alone, drawn from a forked
            # generator: a resumed run rounds as the uninterrupted one did, and nothing else's stream
            # moves. Eager random numbers (not inductor's, which torchao's compiled update would use).
            from torch._inductor import config as inductor

            first = next((self.state[p] for g in self.param_groups for p in g["params"] if self.state[p]), None)
            done = int(first["step"].item()) if first else 0  # CPU tensor: no device sync
            devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
            with torch.random.fork_rng(devices=devices), inductor.patch(fallback_random=True):
                torch.manual_seed((seed * 1_000_003 + done) % 2**63)  # any seed (torch.initial_seed() is 64-bit)
                return super().step(closure)

        def state_dict(self) -> dict[str, Any]:
            state = super().state_dict()
            state["state"] = {index: {k: _plain(v) for k, v in entry.items()} for index, entry in state["state"].items()}
            return state

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            # torch's loader would cast the moments to the weights' dtype: rebuild them here instead.
            super().load_state_dict({**state_dict, "state": {}})
            params = [p for group in self.param_groups for p in group["params"]]
            for index, entry in state_dict["state"].items():
                param = params[int(index)]
                self.state[param] = {k: _rebuilt(v, param.device) for k, v in entry.items()}

    return PlainStateAdamW8bit(param_groups, lr=lr, betas=betas, eps=eps, bf16_stochastic_round=True)


def adamw8bit_problems(optimizer: str) -> list[str]:
    """One line when `train.optimizer = adamw8bit` cannot run here (torchao missing); the DeepSpeed JSON
    it needs is judged with the JSON's other checks (pretrain.ds_config.optimizer_json_problems)."""
    if optimizer != "adamw8bit":
        return []
    try:
        import torchao.optim  # noqa: F401
    except ImportError:
        return ["train.optimizer = 'adamw8bit' needs torchao (pip install 'lmforge[fp8]', i.e. torchao>=0.17)"]
    return []
