"""Preflight's memory check: the estimate's summary lines, and one refusal line when a run will not fit.

The host's size is MemTotal of /proc/meminfo (or --host-memory-gib, to judge a launch for another
machine); the GPU's is the visible GPU's total memory (or --gpu-memory-gib). Without either GPU source
the run is estimated as it would run here (DeepSpeed's CPU accelerator, everything in host memory) and
only the host is judged. Runs with pipeline, tensor, sequence or expert parallelism are not modelled:
they get a note and no refusal.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from launch.memory_estimate import GIB, MemoryEstimate, estimate_memory

MEMINFO = Path("/proc/meminfo")


def host_memory_bytes(meminfo: Path = MEMINFO) -> int | None:
    """MemTotal of /proc/meminfo in bytes; None where there is no such file (not Linux)."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def gpu_memory_bytes() -> int | None:
    import torch

    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def top_items(estimate: MemoryEstimate, where: str) -> str:
    return ", ".join(f"{item.name} {_gib(item.bytes)}" for item in estimate.largest(where, 3))


def refusal(estimate: MemoryEstimate, where: str, capacity: int, source: str) -> str | None:
    """The one line refusing a run whose `where` ('host' or 'gpu') peak exceeds `capacity`; None if it fits."""
    peak = estimate.host_peak if where == "host" else estimate.gpu_peak
    if peak <= capacity:
        return None
    knobs = list(dict.fromkeys(item.knob for item in estimate.largest(where, 4) if item.knob))
    whose = f" ({estimate.ranks_per_host} ranks on a host)" if where == "host" and estimate.ranks_per_host > 1 else ""
    return (f"estimated {where} peak {_gib(peak)}{whose} > {source} {_gib(capacity)}; largest: {top_items(estimate, where)}; "
            f"lower it with {' or '.join(knobs[:3]) or 'a smaller model'} (lmforge preflight --help: --host-memory-gib, --gpu-memory-gib)")


def check_memory(config, ds_config: dict[str, Any], world: int, found, host_gib: float | None, gpu_gib: float | None) -> None:
    """Adds preflight's `memory` fact and, when the estimate does not fit, one problem per side to `found`."""
    from pretrain.pipeline import data_parallel_size

    parallel = config.parallel
    if config.model.vocab_size is None:
        found.fact("memory", "not estimated: the vocabulary is unknown (the data could not be read; or set model.vocab_size)")
        return
    if max(parallel.pipeline_stages, parallel.tensor, parallel.sequence, parallel.expert) > 1:
        found.fact("memory", "not estimated: the estimate models data parallelism only (parallel.* > 1)")
        return
    gpu_capacity = int(gpu_gib * GIB) if gpu_gib is not None else gpu_memory_bytes()
    device = "cuda" if gpu_capacity is not None else "cpu"
    estimate = estimate_memory(config.model, config.train, ds_config, data_parallel_size(parallel, world),
                               device=device, ranks_per_host=found.ranks_per_host or world)
    host_capacity = int(host_gib * GIB) if host_gib is not None else host_memory_bytes()
    host_source = "--host-memory-gib" if host_gib is not None else "this machine's MemTotal"
    found.fact("memory", f"estimated GPU peak {_gib(estimate.gpu_peak)} per rank ({device}), host peak "
                         f"{_gib(estimate.host_peak)}" + (f" of {_gib(host_capacity)}" if host_capacity else "")
               + f"; host: {top_items(estimate, 'host')}" + (f"; GPU: {top_items(estimate, 'gpu')}" if device == "cuda" else ""))
    problems = []
    if host_capacity is not None:
        problems.append(refusal(estimate, "host", host_capacity, host_source))
    if gpu_capacity is not None:
        problems.append(refusal(estimate, "gpu", gpu_capacity, "--gpu-memory-gib" if gpu_gib is not None else "this GPU's"))
    found.problems += [p for p in problems if p]
