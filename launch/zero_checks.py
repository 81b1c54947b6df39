"""Checks of a DeepSpeed JSON that DeepSpeed itself makes only after the GPUs are allocated.

ZeRO stage and offload combinations (optimizer offload needs stage >= 1, parameter offload
stage 3, NVMe offload a path), and precision against the GPU on this machine.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

OFFLOAD_DEVICES = ("none", "cpu", "nvme")


def _offload_problems(zero: dict[str, Any], stage: int, source: Path) -> list[str]:
    found = []
    for key, min_stage, what in (("offload_optimizer", 1, "optimizer states"), ("offload_param", 3, "parameters")):
        section = zero.get(key)
        if not section:
            continue
        if not isinstance(section, dict):
            found.append(f"{source}: zero_optimization.{key} = {section!r}: expected an object like {{\"device\": \"cpu\"}}")
            continue
        device = section.get("device", "none")
        if device not in OFFLOAD_DEVICES:
            found.append(f"{source}: zero_optimization.{key}.device = {device!r}: expected one of {', '.join(OFFLOAD_DEVICES)}")
            continue
        if device == "none":
            continue
        if stage < min_stage:
            found.append(
                f"{source}: zero_optimization.{key}.device = {device!r} with zero_optimization.stage = {stage}: "
                f"offloading {what} needs stage {min_stage}{' or higher' if min_stage < 3 else ''}"
            )
        if device == "nvme" and not section.get("nvme_path"):
            found.append(f"{source}: zero_optimization.{key}.device = 'nvme' needs zero_optimization.{key}.nvme_path")
    return found


def zero_problems(ds_config: dict[str, Any], source: Path) -> list[str]:
    """ZeRO stage and offload problems of a merged DeepSpeed config, each naming `source` and the key."""
    zero = ds_config.get("zero_optimization", {})
    if not isinstance(zero, dict):
        return [f"{source}: zero_optimization = {zero!r}: expected an object"]
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        return [f"{source}: zero_optimization.stage = {stage!r}: expected 0, 1, 2 or 3"]
    return _offload_problems(zero, stage, source)


def precision_problems(raw_config: dict[str, Any], source: Path, gpu_name: str | None, gpu_bf16: bool) -> list[str]:
    """bf16/fp16 asked for explicitly (not "auto") that this machine's GPU cannot do; no GPU: no check.

    A launch node without GPUs cannot judge the compute nodes, so only a GPU that is here is checked.
    """
    if gpu_name is None:
        return []
    if raw_config.get("bf16", {}).get("enabled") is True and not gpu_bf16:
        return [
            f"{source}: bf16.enabled = true but {gpu_name} has no bf16 support; "
            "set it to \"auto\" (fp32 there) or use ds_configs/zero2_fp16.json"
        ]
    return []
