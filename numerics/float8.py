"""FP8 matmuls for training (`train.float8`): torchao's float8 training on the blocks' linear layers.

torchao (`torchao.float8.convert_to_float8_training`) swaps each chosen `nn.Linear` for its
`Float8Linear`: the same fp32 weight parameter (so checkpoints, ZeRO partitioning, export and
resume see the same tensors and names), but the forward and backward matmuls run in float8 (e4m3
for inputs and weights, e5m2 for the output gradient) with a scale per tensor (`tensorwise`) or per
row (`rowwise`: more accurate, slower), computed from the current values on every step. Under
torch.compile the casts fuse with their neighbours; without it they cost more than they save.

Not converted: the LM head (its logits feed the softmax directly; torchtitan and torchao's own
recipes keep it in bf16) and any layer whose dimensions are not multiples of 16 (the float8 GEMM's
requirement), e.g. a MoE router.
"""
from __future__ import annotations

import torch


def float8_recipe(choice: str, device: torch.device | None) -> str:
    """The recipe `train.float8 = choice` runs on `device`: "auto" is tensorwise on a GPU of compute capability
    >= 8.9 with torchao installed (where it measured faster at 1.1B parameters, docs/performance.md), else off."""
    if choice != "auto":
        return choice
    if device is None or device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        return "off"
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        return "off"
    return "tensorwise"


def float8_problems(recipe: str, device: torch.device | None) -> list[str]:
    """One line per reason `train.float8 = recipe` cannot run here (empty when it can)."""
    if float8_recipe(recipe, device) == "off":
        return []
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        return [f"train.float8 = {recipe!r} needs torchao (pip install 'lmforge[fp8]', i.e. torchao>=0.17)"]
    if device is not None and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        return [f"train.float8 = {recipe!r}: float8 matmuls need a GPU of compute capability 8.9 or newer "
                f"(Ada, Hopper); this one is {major}.{minor}: set train.float8 = off"]
    return []


def converts(module: torch.nn.Module, name: str) -> bool:
    """Which linear layers run in float8: not the LM head, and only float8-GEMM-sized ones."""
    if not isinstance(module, torch.nn.Linear):
        return True  # a container: descend into it
    return name != "lm_head" and module.in_features % 16 == 0 and module.out_features % 16 == 0


def convert_to_float8(model: torch.nn.Module, recipe: str) -> int:
    """Swaps the chosen linear layers of `model` for torchao's Float8Linear in place (before
    compile and before DeepSpeed wraps it); returns how many were converted."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    from torchao.float8.float8_linear import Float8Linear

    convert_to_float8_training(model, module_filter_fn=converts, config=Float8LinearConfig.from_recipe_name(recipe))
    return sum(isinstance(m, Float8Linear) for m in model.modules())
