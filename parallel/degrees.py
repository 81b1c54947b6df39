"""Whether the `parallel` section's degrees fit the launched world and the model's shapes.

`degree_problems` judges plain numbers (parallel/ sits below pretrain/, so the model arrives as
anything with the attributes of `ModelShapes`, e.g. pretrain.model.ModelConfig). It is one of the
launch checks (pretrain.run_checks.check_launch, which `lmforge train` and `lmforge preflight`
run), so a bad layout is refused before anything is created. The pipeline's own rules (stages
against blocks and ZeRO stage) stay in pretrain.pipeline.pipeline_problems.
"""
from __future__ import annotations

from typing import Protocol

from parallel.config import ParallelConfig


class ModelShapes(Protocol):
    """The sizes the degrees must divide (pretrain.model.ModelConfig has them)."""

    n_heads: int
    kv_heads: int
    hidden_dim: int


def _product(parallel: ParallelConfig) -> int:
    return max(parallel.pipeline_stages, 1) * max(parallel.tensor, 1) * max(parallel.sequence, 1)


def data_degree(parallel: ParallelConfig, world_size: int) -> int | None:
    """parallel.data, or (null) the world over pipeline × tensor × sequence; None where that does not divide."""
    if parallel.data is not None:
        return parallel.data
    rest = _product(parallel)
    return world_size // rest if world_size % rest == 0 else None


def _world_problems(parallel: ParallelConfig, world_size: int) -> list[str]:
    p, t, s = parallel.pipeline_stages, parallel.tensor, parallel.sequence
    if parallel.data is not None:
        if parallel.data * _product(parallel) != world_size:
            return [f"parallel.data = {parallel.data} × parallel.pipeline_stages = {p} × parallel.tensor = {t} × "
                    f"parallel.sequence = {s} = {parallel.data * _product(parallel)}, but {world_size} rank(s) were launched; "
                    "make the product the world size, or set parallel.data to null to derive it"]
        return []
    if t == s == 1:
        return []  # pipeline stages alone: pretrain.pipeline.pipeline_problems says it
    if world_size % _product(parallel):
        return [f"parallel.pipeline_stages = {p} × parallel.tensor = {t} × parallel.sequence = {s} = {_product(parallel)} "
                f"does not divide the {world_size} rank(s) launched; launch a multiple of {_product(parallel)} ranks"]
    return []


def _tensor_problems(parallel: ParallelConfig, model: ModelShapes) -> list[str]:
    t, found = parallel.tensor, []
    if t <= 1:
        return found
    for key, value in (("model.n_heads", model.n_heads), ("model.n_kv_heads", model.kv_heads),
                       ("model.d_ff (the MLP hidden width)", model.hidden_dim)):
        if value % t:
            found.append(f"parallel.tensor = {t} does not divide {key} = {value}: each tensor-parallel rank holds "
                         f"1/{t} of them; choose a tensor degree that divides it")
    return found


def _sequence_problems(parallel: ParallelConfig, model: ModelShapes, seq_len: int) -> list[str]:
    s, found = parallel.sequence, []
    if s <= 1:
        return found
    if seq_len % s:
        found.append(f"parallel.sequence = {s} does not divide train.seq_len = {seq_len}: every rank holds an equal piece of each sequence")
    if model.n_heads % s:
        found.append(f"parallel.sequence = {s} does not divide model.n_heads = {model.n_heads}: Ulysses gives each rank "
                     f"1/{s} of the heads during attention")
    if model.kv_heads % s:
        found.append(f"parallel.sequence = {s} does not divide model.n_kv_heads = {model.kv_heads}: Ulysses' all-to-all "
                     f"splits the key/value heads too")
    return found


def _expert_problems(parallel: ParallelConfig, model: ModelShapes, data: int | None) -> list[str]:
    e, found = parallel.expert, []
    if e <= 1:
        return found
    n_experts = int(getattr(model, "n_experts", 0) or 0)
    if n_experts == 0:
        found.append(f"parallel.expert = {e} but model.n_experts = 0: expert parallelism needs mixture-of-experts blocks; "
                     "set model.n_experts or parallel.expert = 1")
    elif n_experts % e:
        found.append(f"parallel.expert = {e} does not divide model.n_experts = {n_experts}: each rank holds an equal share of the experts")
    if data is not None and data % e:
        found.append(f"parallel.expert = {e} does not divide the {data} data-parallel rank(s): experts are spread over "
                     "ranks of the data-parallel group")
    return found


def _combination_problems(parallel: ParallelConfig, zero_stage: int) -> list[str]:
    t, found = parallel.tensor, []
    if t <= 1:
        return found
    if zero_stage >= 3:
        found.append(f"parallel.tensor = {t} with zero_optimization.stage = {zero_stage}: lmforge's tensor-parallel runs use "
                     "ZeRO stage 0-2 (its checkpoint merge reads per-rank module states); use ds_configs/zero1.json or zero2.json")
    if parallel.pipeline_stages > 1:
        found.append(f"parallel.tensor = {t} with parallel.pipeline_stages = {parallel.pipeline_stages}: DeepSpeed's "
                     "pipeline engine does not take AutoTP layers; choose one of the two")
    for key in ("sequence", "expert"):
        if getattr(parallel, key) > 1:
            found.append(f"parallel.tensor = {t} with parallel.{key} = {getattr(parallel, key)}: not supported together "
                         "in lmforge yet; choose one of the two")
    return found


def degree_problems(parallel: ParallelConfig, world_size: int, model: ModelShapes, seq_len: int, zero_stage: int) -> list[str]:
    """Every reason the degrees cannot run on `world_size` ranks for this model, one line each
    naming the keys and their values (empty: the layout fits)."""
    found = parallel.problems()
    if found:
        return found
    found += _world_problems(parallel, world_size)
    found += _tensor_problems(parallel, model)
    found += _sequence_problems(parallel, model, seq_len)
    found += _expert_problems(parallel, model, data_degree(parallel, world_size))
    found += _combination_problems(parallel, zero_stage)
    return found
