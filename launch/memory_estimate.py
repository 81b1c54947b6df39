"""How much GPU and host memory one training run needs, from its shapes and DeepSpeed JSON alone.

`estimate_memory(model, train, ds_config, world, ...)` -> `MemoryEstimate`: the peak bytes of one GPU
and of one host (all the host's ranks), each the sum of named `MemoryItem`s, so `lmforge preflight`
can print the largest and say which knob lowers them. Nothing is built or allocated.

Where the bytes go, per parameter N and data-parallel rank count W (`_model_states`):

| precision (JSON)            | weights kept by the engine | gradients | fp32 master        | Adam m, v |
| --------------------------- | -------------------------- | --------- | ------------------ | --------- |
| torch_autocast (shipped)    | fp32, 4                    | fp32, 4   | ZeRO-1/2: 4/W clone; ZeRO-3: none (the weights are it) | 8/W |
| bf16 / fp16                 | 2                          | 2         | 4/W                | 8/W       |
| fp32                        | 4                          | 4         | ZeRO-1/2: 4/W clone; ZeRO-3: none | 8/W |

ZeRO-1 keeps the whole gradient, ZeRO-2 and 3 its 1/W partition (plus the reduce buckets); ZeRO-3
partitions the weights too and gathers at most `stage3_max_live_parameters` of them at once.
`offload_optimizer` moves the fp32 master, Adam's moments and the fp32 gradient partition to the
host (pinned when `pin_memory`); with ZeRO-3 `ratio` < 1 only the last fraction of the optimizer's
sub-groups (`sub_group_size` elements each) goes there: stage3.py puts sub-group i on the CPU when
i >= int((1 - ratio) * count), so the split is by whole sub-groups. `offload_param` (ZeRO-3) keeps
the weight partition on the host. Without `zero.Init` every rank first builds the whole model in
fp32 on the host (4 N per rank); lmforge builds ZeRO-3 models under zero.Init (pretrain.engine.build_model).

Activations (`_activations`) are counted per layer from what this repo's Llama/GPT-2 blocks save for
backward under bf16 autocast (the residual stream stays fp32, matmul inputs are bf16, SDPA keeps no
T×T matrix); with activation checkpointing a checkpointed block keeps only its fp32 input and one
block is recomputed at a time. Under torch_autocast, torch.autocast's cast cache holds a bf16 copy of every
weight the forward used until the forward ends (2 B/param; DeepSpeed enters autocast with its default
cache_enabled=True, runtime/torch_autocast.py). The logits are counted apart: bf16 out of the head, its fp32 copy,
cross-entropy's fp32 log-softmax and, in backward, the fp32 gradient: 14 bytes per token and vocab entry.

Cross-check with DeepSpeed's estimators (tests/launch/test_memory_estimate.py): `estimate_zero2_model_states_mem_needs`
and `estimate_zero3_model_states_mem_needs` count model states only, assume bf16/fp16 weights (2 B)
and multiply the host side by `additional_buffer_factor` = 1.5 as a margin. Ours differs because it
(a) counts the shipped torch_autocast JSONs' fp32 weights and gradients (4 + 4 B, where DeepSpeed says
2 + 2), (b) has no blanket 1.5 factor but names the buffers (buckets, pinned staging, baseline RSS),
(c) counts activations, logits and the CUDA context, and (d) models `ratio` (DeepSpeed's has no term).
At ZeRO-3 with both offloads, 1 GPU, bf16: ours ~ 18 N host (2 weights + 4 master + 4 grads + 8 Adam),
DeepSpeed's 18 N × 1.5 = 27 N; the test holds ours within that factor of theirs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Literal

from pretrain.config import TrainConfig
from pretrain.ds_config import activation_checkpoint_every, precision_of, zero_stage_of
from pretrain.model import ModelConfig

GIB = 2**30
HOST_BASELINE_BYTES = int(0.35 * GIB)
"""RSS of a rank after `import torch, deepspeed` and the engine's Python objects (0.24 GiB measured on CPU torch)."""
HOST_CUDA_RUNTIME_BYTES = int(2.0 * GIB)
"""Host RSS the CUDA runtime, cuBLAS/NCCL libraries and their mappings add to a GPU rank (to be calibrated on the H200)."""
HOST_ENGINE_BYTES = int(0.25 * GIB)
"""RSS a rank gains building a DeepSpeed engine beyond its tensors (CPU-Adam's extension, engine objects, allocator):
the fixed part of the calibration fit on the CPU (tests/launch/test_memory_estimate.py, docs/performance.md)."""
GPU_CONTEXT_BYTES = int(0.6 * GIB)
"""GPU memory the CUDA context and cuBLAS workspaces take before any tensor."""
GPU_ALLOCATOR_SLACK = 0.05
"""Fraction of allocated GPU bytes lost to the caching allocator's fragmentation."""


@dataclass(frozen=True)
class MemoryItem:
    name: str
    """What holds the bytes (`fp32 master weights`, `activations`, ...)."""
    where: str
    """'gpu' or 'host'."""
    bytes: int
    """Bytes of one rank (gpu) or of all the host's ranks together (host)."""
    knob: str = ""
    """The setting that lowers it, for a refusal's hint."""
    phase: Literal["always", "backward", "step"] = "always"
    """When it is alive: all along, during forward/backward (activations), or in the optimizer step only."""


@dataclass(frozen=True)
class MemoryEstimate:
    items: tuple[MemoryItem, ...]
    """Every counted item, GPU and host."""
    params: int
    """Parameters of the model."""
    ranks_per_host: int
    """Ranks whose host memory is summed in host_peak."""

    def peak(self, where: str) -> int:
        """Items alive all along, plus the larger of the backward-only and the step-only ones."""
        mine = [i for i in self.items if i.where == where]
        phase = {p: sum(i.bytes for i in mine if i.phase == p) for p in ("always", "backward", "step")}
        return phase["always"] + max(phase["backward"], phase["step"])

    @property
    def gpu_peak(self) -> int:
        return self.peak("gpu")

    @property
    def host_peak(self) -> int:
        return self.peak("host")

    def largest(self, where: str, count: int = 4) -> list[MemoryItem]:
        return sorted((i for i in self.items if i.where == where), key=lambda i: -i.bytes)[:count]


def _zero(ds_config: dict[str, Any]) -> dict[str, Any]:
    return ds_config.get("zero_optimization") or {}


def _offload(ds_config: dict[str, Any], key: str) -> dict[str, Any] | None:
    section = _zero(ds_config).get(key) or {}
    return section if section.get("device", "none") not in ("none", None) else None


def host_fraction_of_optimizer(ds_config: dict[str, Any], partition: int) -> float:
    """Fraction of a rank's optimizer partition DeepSpeed keeps on the host: 0 without offload_optimizer, else by
    whole sub-groups of `sub_group_size` elements (ZeRO-3 `ratio`, stage3.py's int((1 - ratio) * count) rule)."""
    offload = _offload(ds_config, "offload_optimizer")
    if offload is None:
        return 0.0
    ratio = float(offload.get("ratio", 1.0))
    if zero_stage_of(ds_config) != 3 or ratio >= 1.0:
        return 1.0
    sub_group = int(_zero(ds_config).get("sub_group_size", 1_000_000_000)) or partition
    count = max(1, math.ceil(partition / sub_group))
    on_cpu = count - int((1 - ratio) * count)
    return min(partition, on_cpu * sub_group) / partition if partition else 0.0


def _model_states(n: int, world: int, ds_config: dict[str, Any]) -> list[MemoryItem]:
    """Weights, gradients, fp32 master and Adam moments of one rank, on the device or host as the JSON puts them."""
    stage, precision = zero_stage_of(ds_config), precision_of(ds_config)
    low = precision in ("bf16", "fp16")
    weight_bytes = 2 if low else 4
    part = math.ceil(n / world)
    items = []
    param_offload = _offload(ds_config, "offload_param") if stage == 3 else None
    weights = part if stage == 3 else n
    items.append(MemoryItem(f"{'bf16' if low else 'fp32'} weights{' partition' if stage == 3 else ''}",
                            "host" if param_offload else "gpu", weights * weight_bytes,
                            "zero_optimization.stage = 3" if stage < 3 else "zero_optimization.offload_param"))
    host_share = host_fraction_of_optimizer(ds_config, part)
    on_host = int(part * host_share)
    offloaded = _offload(ds_config, "offload_optimizer") is not None
    # With offload_optimizer the whole gradient partition lives in one host buffer, whatever the ratio (stage3.py:
    # grad_partitions_flat_buffer on self.device = cpu); the device's sub-groups copy theirs back for the step.
    grads = n if stage <= 1 else (0 if offloaded else part)
    items.append(MemoryItem(f"{'bf16' if low else 'fp32'} gradients{' partition' if stage >= 2 else ''}", "gpu",
                            grads * weight_bytes, "zero_optimization.stage = 2"))
    knob = "zero_optimization.offload_optimizer (ratio)"
    # fp32 weights are their own master at ZeRO-0 (torch's optimizer steps them) and on the device at ZeRO-3
    # (stage3.py; offloaded sub-groups get a copy); ZeRO-1/2 clone them, and 16-bit weights always need one.
    gpu_master = 4 * (part - on_host) if (low or 1 <= stage < 3) else 0
    for name, host_bytes, gpu_bytes in (("fp32 master weights", 4 * on_host, gpu_master),
                                        ("Adam moments (fp32 m, v)", 8 * on_host, 8 * (part - on_host))):
        if host_bytes:
            items.append(MemoryItem(name, "host", host_bytes, "lower offload_optimizer.ratio"))
        if gpu_bytes:
            items.append(MemoryItem(name, "gpu", gpu_bytes, knob))
    items = [item for item in items if item.bytes]
    if low and stage < 3 and part > on_host:  # stage_1_and_2's step flattens the bf16 gradient partition into fp32
        items.append(MemoryItem("fp32 gradient partition (optimizer step)", "gpu", 4 * (part - on_host), knob, "step"))
    if stage == 3 and offloaded and part > on_host:
        items.append(MemoryItem("fp32 gradients of the device's sub-groups (optimizer step)", "gpu", 4 * (part - on_host),
                                knob, "step"))
    if host_share:  # the fp32 gradient partition the CPU optimizer reads (pinned when pin_memory)
        items.append(MemoryItem("fp32 gradient partition (host buffer)", "host", (part if stage == 3 else on_host) * 4,
                                "zero_optimization.offload_optimizer"))
        if stage < 3:  # stage_1_and_2 keeps a bf16/fp32 copy to send updated weights back
            items.append(MemoryItem("weight staging for CPU offload", "host", part * weight_bytes, "zero_optimization.offload_optimizer"))
    return items


def _adamw8bit_states(n: int) -> list[MemoryItem]:
    """train.optimizer = adamw8bit (numerics/adamw8bit.py, ZeRO-0): bf16 weights and gradients, both Adam
    moments in 8 bits with one fp32 scale per 256 values; no fp32 master."""
    knob = "train.optimizer = adamw8bit (bf16 weights, 8-bit moments)"
    return [MemoryItem("bf16 weights", "gpu", 2 * n, knob), MemoryItem("bf16 gradients", "gpu", 2 * n, knob),
            MemoryItem("Adam moments (8-bit m, v and their scales)", "gpu", 2 * n + 2 * 4 * math.ceil(n / 256), knob)]


def _buffers(n: int, largest_layer: int, ds_config: dict[str, Any]) -> list[MemoryItem]:
    """DeepSpeed's communication buffers on the device: reduce/allgather buckets, ZeRO-3's gathered parameters."""
    zero, stage = _zero(ds_config), zero_stage_of(ds_config)
    grad_bytes = 2 if precision_of(ds_config) in ("bf16", "fp16") else 4
    if stage == 0:
        return []
    reduce = int(zero.get("reduce_bucket_size", 500_000_000))
    # stage3.py allocates one contiguous bucket of reduce_bucket_size (counted up to N: untouched host pages are
    # not resident); stage_1_and_2 double-buffers it with overlap_comm.
    copies = 2 if stage < 3 and zero.get("overlap_comm") else 1
    items = [MemoryItem("reduce bucket(s)", "gpu", min(reduce, n) * grad_bytes * copies, "zero_optimization.reduce_bucket_size")]
    if stage == 3:  # autograd's full-size gradients of gathered parameters, waiting in the bucket for reduce-scatter
        items.append(MemoryItem("full gradients before reduce-scatter", "gpu", min(reduce, n) * grad_bytes,
                                "zero_optimization.reduce_bucket_size", "backward"))
    if stage in (1, 2):
        gather = int(zero.get("allgather_bucket_size", 500_000_000))
        items.append(MemoryItem("allgather bucket", "gpu", min(gather, n) * grad_bytes, "zero_optimization.allgather_bucket_size"))
    else:
        live = int(zero.get("stage3_max_live_parameters", 1_000_000_000))
        prefetch = int(zero.get("stage3_prefetch_bucket_size", 50_000_000))
        gathered = min(n, max(live, largest_layer) + prefetch)
        items.append(MemoryItem("ZeRO-3 gathered parameters (max_live + prefetch)", "gpu", gathered * grad_bytes,
                                "zero_optimization.stage3_max_live_parameters"))
    return items


def activation_bytes_per_layer(model: ModelConfig, tokens: int) -> int:
    """Bytes one block saves for backward for `tokens` tokens (micro_batch × seq_len) under bf16 autocast."""
    d, h, kv = model.d_model, model.hidden_dim, model.kv_heads * model.head_dim
    attention = 4 * d + 2 * d + 2 * (d + 2 * kv) + 2 * (d + kv) + 2 * d + 2 * d  # norm in, its bf16 out, qkv, rope, sdpa out, proj in
    mlp = 4 * d + 2 * d + (2 * 4 * h if model.arch == "llama" else 2 * 2 * h)  # norm in/out; gate, up, silu, product (or fc, gelu)
    return tokens * (attention + mlp + 4 * d)  # + the fp32 residual add


def _activations(model: ModelConfig, train: TrainConfig, ds_config: dict[str, Any], n_params: int | None = None) -> list[MemoryItem]:
    tokens = train.micro_batch_size * train.seq_len
    per_layer = activation_bytes_per_layer(model, tokens)
    every = activation_checkpoint_every(ds_config, model.n_layers)
    if every is None:
        kept = model.n_layers * per_layer
        name, knob = f"activations ({model.n_layers} layers, no checkpointing)", "activation_checkpointing (a JSON section)"
    else:
        checkpointed = math.ceil(model.n_layers / every)
        kept = checkpointed * 4 * tokens * model.d_model + (model.n_layers - checkpointed) * per_layer + per_layer
        name, knob = f"activations (checkpointing every {every} block(s), one recomputed)", "train.micro_batch_size"
    logits = 14 * tokens * model.padded_vocab_size
    cache = []
    if precision_of(ds_config).startswith("autocast"):  # torch.autocast (cache_enabled) keeps a bf16 cast of every weight until forward ends
        n = n_params or 0
        cache = [MemoryItem("torch.autocast's bf16 weight-cast cache (forward)", "gpu", 2 * n, "bf16 (DeepSpeed's, not torch_autocast)", "backward")]
    return cache + [MemoryItem(name, "gpu", kept, knob, "backward"),
            MemoryItem("logits and cross-entropy (bf16 + fp32 copies)", "gpu", logits, "train.micro_batch_size", "backward")]


def largest_layer_params(model: ModelConfig) -> int:
    """The largest single parameter tensor (the embedding or head), what ZeRO-3 must gather whole."""
    return max(model.padded_vocab_size * model.d_model, model.d_model * model.hidden_dim)


def estimate_memory(model: ModelConfig, train: TrainConfig, ds_config: dict[str, Any], world: int,
                    device: str = "cuda", ranks_per_host: int | None = None, zero_init: bool | None = None) -> MemoryEstimate:
    """GPU peak of one rank and host peak of one host for training `model` with `train` and DeepSpeed's merged
    `ds_config` on `world` data-parallel ranks (`ranks_per_host` of them on one host, default all).

    device 'cpu' (DeepSpeed's CPU accelerator) puts every 'gpu' item in host memory as well, with no CUDA
    runtime. zero_init (default: true at ZeRO-3 with an offload, as pretrain.engine.build_model builds) says whether ranks skip the
    full fp32 model on the host. Returns the items; `.gpu_peak` / `.host_peak` are their sums."""
    from pretrain.run_checks import parameter_count

    n = parameter_count(model)
    ranks = ranks_per_host or world
    if zero_init is None:  # as pretrain.engine.build_model builds: under zero.Init at ZeRO-3 with an offload
        offloads = _offload(ds_config, "offload_optimizer") or _offload(ds_config, "offload_param")
        zero_init = zero_stage_of(ds_config) == 3 and bool(offloads)
    states = _adamw8bit_states(n) if train.optimizer == "adamw8bit" else _model_states(n, world, ds_config)
    rank_items = states + _buffers(n, largest_layer_params(model), ds_config)
    rank_items += _activations(model, train, ds_config, n)
    gpu = [i for i in rank_items if i.where == "gpu"]
    host = [i for i in rank_items if i.where == "host"]
    if device == "cpu":
        host, gpu = host + [replace(i, where="host") for i in gpu], []
    else:
        allocated = MemoryEstimate(tuple(gpu), n, ranks).gpu_peak
        gpu += [MemoryItem("CUDA context", "gpu", GPU_CONTEXT_BYTES),
                MemoryItem("allocator fragmentation", "gpu", int(allocated * GPU_ALLOCATOR_SLACK))]
        host.append(MemoryItem("CUDA runtime and libraries", "host", HOST_CUDA_RUNTIME_BYTES))
    host.append(MemoryItem("process baseline (torch + deepspeed)", "host", HOST_BASELINE_BYTES))
    host.append(MemoryItem("DeepSpeed engine, CPU-Adam extension, allocator", "host", HOST_ENGINE_BYTES))
    if train.optimizer == "adamw8bit" and device == "cuda":
        zero_init = True  # pretrain.train builds it on the GPU (4 N there for a moment, less than what follows)
    if not zero_init:
        host.append(MemoryItem("full fp32 model built on the host before the engine", "host", 4 * n,
                               "zero_optimization.stage = 3 (built under deepspeed.zero.Init)"))
    host = [replace(i, bytes=i.bytes * ranks) for i in host]
    return MemoryEstimate(tuple(gpu + host), n, ranks)

