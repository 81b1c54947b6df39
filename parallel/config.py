"""The `parallel` config section: how many ways each kind of parallelism splits the job.

Ranks = data × pipeline_stages × tensor × sequence; `expert` splits the experts of every MoE
block over ranks of the data(-and-sequence) group. Checks against the world size and the model's
shapes are `parallel.degrees.degree_problems` (they need the launched world).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class ParallelConfig:
    data: int | None = None
    """Data-parallel replicas (ZeRO shards over them); null: the world size over the other degrees."""
    pipeline_stages: int = 1
    """Pipeline stages (DeepSpeed PipelineModule); ranks = stages × data-parallel replicas."""
    partition_method: Literal["parameters", "uniform"] = "parameters"
    """How blocks are split across stages: by parameter count or by equal block counts."""
    tensor: int = 1
    """Tensor-parallel degree: each attention/MLP matrix split over this many ranks."""
    sequence: int = 1
    """DeepSpeed-Ulysses sequence-parallel degree: each sequence split over this many ranks."""
    expert: int = 1
    """Expert-parallel degree: the experts of each MoE block spread over this many ranks."""

    def problems(self) -> list[str]:
        found = []
        for key in ("pipeline_stages", "tensor", "sequence", "expert"):
            if getattr(self, key) < 1:
                found.append(f"parallel.{key} = {getattr(self, key)}: must be at least 1")
        if self.data is not None and self.data < 1:
            found.append(f"parallel.data = {self.data}: must be at least 1 (or null for the world size over the other degrees)")
        return found
