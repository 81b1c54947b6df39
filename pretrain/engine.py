"""Wraps the plain model in a DeepSpeed engine: parameter groups, activation checkpointing (pretrain/activation_checkpointing.py), compile.

With DeepSpeed's `pipeline.stages` > 1 in the JSON (filled from `parallel.pipeline_stages` by
`pretrain.pipeline.configure_pipeline`) the engine is DeepSpeed's PipelineEngine over the same
model's modules (pretrain/pipeline.py); the functions below work for both.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable

import deepspeed
import torch

from parallel.tensor import tensor_parallel_groups
from pretrain.activation_checkpointing import apply_activation_checkpointing
from pretrain.ds_config import guards_on_device, offloads_to_host, zero_stage_of
from pretrain.model import Block, ModelConfig, MoEMLP, Transformer
from pretrain.pipeline import build_pipeline_module, pipeline_stages_of


def parameter_groups(model: torch.nn.Module, weight_decay: float, decay_embeddings: bool = False) -> list[dict[str, Any]]:
    """AdamW groups [decayed, not decayed]: decay 2-D weights; never norms or biases; embeddings
    (and a head tied to them) only with `decay_embeddings` (train.decay_embeddings)."""
    embedding_ids = set() if decay_embeddings else {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        if param.dim() >= 2 and id(param) not in embedding_ids:
            decay.append(param)
        else:
            no_decay.append(param)
    # Named: DeepSpeed splits each group into dense and expert-parallel parts by name (MoE layers).
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def parameter_group_names(config: ModelConfig, decay_embeddings: bool = False) -> list[list[str]]:
    """The parameter names of each of `parameter_groups`' groups for a Transformer(config), in the optimizer's
    order: how a saved optimizer state's indices map to names. Built on the meta device (no memory, no random numbers)."""
    with torch.device("meta"):
        model = Transformer(config)
    names = {id(param): name for name, param in model.named_parameters()}
    return [[names[id(param)] for param in group["params"]] for group in parameter_groups(model, 0.0, decay_embeddings)]


def build_model(config: ModelConfig, ds_config: dict[str, Any], device: torch.device | None = None) -> Transformer:
    """The plain model, built for the engine that will wrap it.

    Below ZeRO-3 without pipeline stages (each GPU holds the whole model anyway) it is built on `device`
    when that is a GPU: its random numbers are drawn there in milliseconds (1.6 s on the host for
    gpt2-124m) and no fp32 copy passes through host memory; every rank draws the same weights from the
    same seed. At ZeRO-3 or with pipeline stages it is built on the host, whose memory holds a whole model
    that one GPU may not hold before DeepSpeed partitions it or each stage keeps its layers.

    At ZeRO-3 with an offload (the runs whose host memory is the limit) it is built under `deepspeed.zero.Init`: each weight is partitioned (and placed on the
    GPU, or the CPU with offload_param) as it is created, so no full fp32 copy of the model is ever
    on the host (52 GB for 13B). The random state is rewound and every module's init is replayed
    one module at a time on an fp32 copy of its gathered weights, in the order `Transformer(config)`
    runs them: on a CPU run exactly the plain build's weights; on a GPU drawn there (the same
    distributions from the same seed, deterministic: 13B random numbers take minutes on the CPU).
    Not yet at ZeRO-3 without offload: trained from a zero.Init build, the CPU parity run (tests/pretrain/
    test_loss_parity.py) drifts 1.6e-4 from the reference over 50 steps with equal initial weights (cause open).
    """
    if zero_stage_of(ds_config) != 3 or not offloads_to_host(ds_config) or pipeline_stages_of(ds_config) > 1:
        where = plain_build_device(device, ds_config)
        with torch.device(where) if where is not None else nullcontext():
            return Transformer(config)
    rng = torch.get_rng_state()
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = Transformer(config)
    torch.set_rng_state(rng)
    for module in model.modules():  # creation order: each layer's own reset_parameters
        if hasattr(module, "reset_parameters"):
            _init_gathered(module, lambda m: m.reset_parameters())
    for module in _post_order(model):  # then Transformer's init, as nn.Module.apply runs it
        _init_gathered(module, model._init_weights)
    return model


def plain_build_device(device: torch.device | None, ds_config: dict[str, Any]) -> torch.device | None:
    """Where `build_model` draws a plain build's weights: on the run's GPU below ZeRO-3 without pipeline
    stages, else None (the host: ZeRO-3 and pipeline stages are for models one GPU may not hold whole)."""
    if device is not None and device.type == "cuda" and zero_stage_of(ds_config) < 3 and pipeline_stages_of(ds_config) == 1:
        return device
    return None


def _init_gathered(module: torch.nn.Module, init: Callable[[torch.nn.Module], None]) -> None:
    """Runs `init(module)` on fp32 copies of its gathered weights (the plain build's dtype), on the
    device they were gathered to, then copies the result into the module's partitioned weights."""
    params = list(module.parameters(recurse=False))
    if not params:
        return
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        placed = [p.data for p in params]
        for p in params:
            p.data = p.data.to(dtype=torch.float32, copy=True)  # an init that sets nothing keeps it
        init(module)
        for p, target in zip(params, placed):
            target.copy_(p.data)
            p.data = target


def _post_order(module: torch.nn.Module):
    for child in module.children():
        yield from _post_order(child)
    yield module


def start_compile_workers() -> None:
    """Starts inductor's compile worker processes now rather than at the first compile, as torch itself
    does when its compiler is first called (each worker imports torch: seconds on a fresh machine)."""
    try:
        from torch._inductor.async_compile import maybe_warm_pool
    except ImportError:  # a torch without inductor's worker pool: it starts them itself
        return
    maybe_warm_pool()


def model_parameters(model: torch.nn.Module) -> int:
    """Parameter count, also of a model partitioned by zero.Init (whose tensors are empty here)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in {id(p): p for p in model.parameters()}.values())


def build_engine(model: Transformer, ds_config: dict[str, Any], weight_decay: float, compile_model: bool,
                 decay_embeddings: bool = False, guard_clips: bool = False, compile_scope: str = "model", mpu=None,
                 compile_mode: str = "default", optimizer: str = "adamw"):
    """Returns the DeepSpeed engine (optimizer and WarmupCosineLR scheduler from the JSON).

    The model is compiled in place before DeepSpeed wraps it: measured faster than
    `engine.compile()` (docs/performance.md), and parameter names stay unprefixed in checkpoints.
    A JSON asking for DeepSpeed's DeepCompile (`"compile": {"deepcompile": true}`, e.g.
    ds_configs/zero3.json) is compiled by the engine instead, as DeepCompile requires:
    4.2x faster than the hooks path for ZeRO-3 on one H200.
    A pipelined config builds this rank's stage only (other stages' weights are released).
    `guard_clips`: the caller steps through pretrain.guarded_step.GuardedStep, which at ZeRO-0 with the
    device guard (pretrain.ds_config.guards_on_device) clips to the JSON's gradient_clipping itself,
    so DeepSpeed's clipping is off.
    `mpu`: the process groups of parallelism applied to the model (parallel/sequence.py's UlyssesGroups).
    `optimizer` "adamw8bit" (train.optimizer): the weights become bf16 and torchao's 8-bit AdamW is DeepSpeed's
    client optimizer, with the lr, betas, eps and decay the JSON's optimizer section was filled with (numerics/adamw8bit.py).
    """
    if pipeline_stages_of(ds_config) > 1:
        return _build_pipeline_engine(model, ds_config, weight_decay, compile_model, decay_embeddings)
    if guard_clips and guards_on_device(ds_config) and zero_stage_of(ds_config) == 0:
        # DeepSpeed's ZeRO-0 clipping reads two scalars back from the GPU every step; with the
        # device guard, pretrain.guarded_step clips (to the same gradient_clipping) without waiting.
        ds_config = {**ds_config, "gradient_clipping": 0.0}
    if optimizer == "adamw8bit":
        model.to(torch.bfloat16)  # weights, gradients and activations in bf16: no fp32 copy anywhere
    apply_activation_checkpointing(model, ds_config)
    deepcompile = bool(ds_config.get("compile", {}).get("deepcompile"))
    if compile_model and not deepcompile:
        compile_in_place(model, compile_scope, compile_mode)
    groups = parameter_groups(model, weight_decay, decay_embeddings)
    client = {}
    if optimizer == "adamw8bit":
        from numerics.adamw8bit import build_adamw8bit

        adam = ds_config["optimizer"]["params"]
        client["optimizer"] = build_adamw8bit(groups, adam["lr"], tuple(adam["betas"]), adam["eps"], seed=int(torch.initial_seed()))
        ds_config = {key: value for key, value in ds_config.items() if key != "optimizer"}
    else:
        client["model_parameters"] = groups
    engine, _, _, _ = deepspeed.initialize(
        model=model, config=ds_config, **client,
        # Ulysses' groups (parallel/sequence.py), else AutoTP's (parallel/tensor.py): the checks allow one of them
        mpu=mpu if mpu is not None else tensor_parallel_groups(ds_config),
    )
    if compile_model and deepcompile:
        without_cudnn_attention_for_deepcompile()
        engine.compile()
    _skip_one_rank_allreduce(engine, ds_config)
    _zero_grad_from_a_list(engine, ds_config)
    return engine


def without_cudnn_attention_for_deepcompile() -> None:
    """Scaled-dot-product attention without its cuDNN kernel in this process (flash attention instead),
    for DeepSpeed's DeepCompile: on an H200 (torch 2.11, DeepSpeed 0.19.8) DeepCompile runs the compiled
    forward graph where cuDNN attention returns no log-sum-exp, and inductor's alignment check on that
    output fails the first step ("TypeError: expected Tensor() for op:
    torch.ops.aten._scaled_dot_product_cudnn_attention.default", docs/performance.md)."""
    torch.backends.cuda.enable_cudnn_sdp(False)


def _skip_one_rank_allreduce(engine, ds_config: dict[str, Any]) -> None:
    """ZeRO-0 in a world of one rank: DeepSpeed's gradient all-reduce would flatten every gradient into
    one buffer, all-reduce it over the one rank, divide it by 1 and copy each gradient back (gpt2-124m:
    a 441 MB concatenation, 148 copies and ~1 ms of the H200's time per step, and host time on top,
    bench/trace_summary.py). Off there: the gradients are already the reduced ones. ZeRO 1-3 reduce in
    their own optimizers (pretrain.ds_config.for_one_zero_rank sets those up for one rank)."""
    import torch.distributed as dist

    if zero_stage_of(ds_config) == 0 and (not dist.is_initialized() or dist.get_world_size() == 1):
        engine.enable_backward_allreduce = False


def _zero_grad_from_a_list(engine, ds_config: dict[str, Any]) -> None:
    """ZeRO-0 in fp32 or torch_autocast: DeepSpeed's engine.zero_grad, called after every optimizer step,
    walks the module tree for its parameters (`named_parameters`: 0.63 ms a step for gpt2-124m's 196 tensors
    on the CPU proxy, bench/host_overhead.py); the same parameters, listed once here, are cleared in 0.03 ms.
    ZeRO 1-3 and the bf16/fp16 modes clear gradients in their own optimizers."""
    if zero_stage_of(ds_config) != 0 or any((ds_config.get(key) or {}).get("enabled") for key in ("bf16", "fp16")):
        return
    params = list(engine.module.parameters())

    def zero_grad() -> None:
        for param in params:
            param.grad = None

    engine.zero_grad = zero_grad


class RegionBlock(Block):
    """A plain Block whose forward torch.compile traces and compiles once, as a nested compile region that every
    layer calls with its own weights (train.compile_scope "nested")."""

    forward = torch.compiler.nested_compile_region(Block.forward)


# Inductor options of a "nested" compile. With buffer reuse on, torch 2.13's inductor lets a reused region's
# backward write over buffers that a later call still reads: wrong gradients on the CPU (max difference 246
# against eager on a 3-layer gpt2, tests/pretrain/test_compile_scope.py), exact with it off.
NESTED_INDUCTOR_OPTIONS = {"allow_buffer_reuse": False}


def compile_in_place(model: Transformer, scope: str, mode: str = "default") -> None:
    """torch.compile the model in place, by `scope` (train.compile_scope):
    - "model": the whole model as one graph (every layer traced, lowered and fused alone);
    - "nested": the whole model as one graph in which each plain block is a nested compile region (RegionBlock),
      lowered once and called by every layer: about one block's compile time, the whole model's one guard and
      one autograd node per step (activation-checkpointed blocks stay inline);
    - "blocks": each block alone (identical blocks share one compiled graph) and the LM head with its loss
      (`Transformer.head_loss`: the fp32 cast, log-softmax and cross-entropy fused, never the full-vocabulary
      fp32 logits in eager; at 88a4bac blocks alone ran at 0.72x the whole model, with 19.3 GB peak against
      8.3, docs/performance.md), each its own compiled region with its own guards.
    `mode`: torch.compile's (train.compile_mode)."""
    if scope == "blocks":
        for block in model.blocks:
            block.compile(mode=mode)
        model.head_loss = torch.compile(model.head_loss, mode=mode)  # an instance attribute: names and state_dict unchanged
    elif scope == "nested":
        for block in model.blocks:
            if type(block) is Block and not isinstance(block.mlp, MoEMLP):  # a router's aux loss is a side effect: inline
                block.__class__ = RegionBlock  # as activation checkpointing swaps it: parameter names unchanged
        from torch._inductor import list_mode_options

        # Static shapes: traced with a symbolic length, a region's `T > 1` (the causal flag) reaches SDPA as a SymBool
        # and dynamo refuses the region; a new shape (evaluation's batch) compiles its own graph instead.
        model.compile(dynamic=False, options={**list_mode_options(mode), **NESTED_INDUCTOR_OPTIONS})
    else:
        model.compile(mode=mode)


def _build_pipeline_engine(model: Transformer, ds_config: dict[str, Any], weight_decay: float, compile_model: bool,
                           decay_embeddings: bool):
    stage = build_pipeline_module(model, ds_config)
    if compile_model:
        stage.compile()  # each layer in place, as the plain model
    engine, _, _, _ = deepspeed.initialize(
        model=stage, model_parameters=parameter_groups(stage, weight_decay, decay_embeddings), config=ds_config
    )
    return engine


def is_pipeline(engine) -> bool:
    from deepspeed.runtime.pipe.engine import PipelineEngine

    return isinstance(engine, PipelineEngine)


def optimizer_step(engine, micro_batches) -> torch.Tensor:
    """Forward/backward over (inputs, targets) micro-batches, then DeepSpeed's step at the boundary.

    Returns the mean loss as a device tensor: nothing here waits for the GPU. A pipeline runs
    its 1F1B schedule over the micro-batches and returns the loss averaged over its data-parallel
    replicas, on every stage.
    """
    if is_pipeline(engine):
        return pipeline_step(engine, micro_batches)
    total, count = None, 0
    for inputs, targets in micro_batches:
        loss = engine(inputs, targets)
        engine.backward(loss)
        engine.step()
        total = loss.detach().float() if total is None else total + loss.detach().float()
        count += 1
    return total / count


def pipeline_step(engine, micro_batches, at_boundary: Callable[[torch.Tensor], Any] | None = None) -> torch.Tensor:
    """One optimizer step of a PipelineEngine (DeepSpeed's train_batch over the micro-batches).

    `at_boundary(loss_sum)` runs on every rank of the pipeline once the gradients are reduced
    (across data-parallel replicas and tied stages), right before the optimizer step: `loss_sum`
    is the sum of this rank's micro-batch losses on the last stage, 0 on the others. It returns a
    context manager the optimizer step then runs in (e.g. one that suppresses it), or None.
    Returns the mean loss over the micro-batches and the data-parallel replicas, on every stage.
    """
    if at_boundary is not None:
        from deepspeed.runtime.pipe import schedule
        from deepspeed.runtime.pipe.engine import PipelineEngine

        take_step = PipelineEngine._INSTRUCTION_MAP[schedule.OptimizerStep]

        def guarded_optimizer_step(self, *args, **kwargs):
            local = self.total_loss if self.is_last_stage() and self.total_loss is not None else torch.zeros((), device=self.device)
            with at_boundary(local.detach().float()) or nullcontext():
                take_step(self, *args, **kwargs)

        # DeepSpeed looks up each schedule instruction in this map; the instance's copy wins for one step.
        engine._INSTRUCTION_MAP = {**PipelineEngine._INSTRUCTION_MAP, schedule.OptimizerStep: guarded_optimizer_step}
    try:
        return engine.train_batch(data_iter=iter(micro_batches)).detach().float().reshape(())
    finally:
        engine.__dict__.pop("_INSTRUCTION_MAP", None)


@torch.no_grad()
def evaluation_loss(engine, inputs: torch.Tensor, targets: torch.Tensor,
                    segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Mean loss of one batch without gradients (fp32, on device; a pipeline's, on every stage);
    `segment_ids`: documents kept apart (data.document_masking, never with a pipeline)."""
    if is_pipeline(engine):
        loss = engine.eval_batch(iter([(inputs, targets)]), num_micro_batches=1)
        return loss.detach().float().reshape(())
    if segment_ids is not None:
        return engine(inputs, targets, segment_ids=segment_ids).detach().float()
    return engine(inputs, targets).detach().float()


def data_parallel_position(engine) -> tuple[int, int]:
    """(rank, size) of this process among the data-parallel replicas: who reads which samples.

    All stages of one pipeline share a data-parallel rank: the first stage needs the inputs, the
    last the targets of the same samples; so do the ranks of one tensor-parallel group (DeepSpeed's
    data-parallel group excludes them), which must see the same batch.
    """
    import torch.distributed as dist

    if is_pipeline(engine):
        return engine.grid.get_data_parallel_rank(), engine.grid.get_data_parallel_world_size()
    if not dist.is_initialized():
        return 0, 1
    group = engine.data_parallel_group if hasattr(engine, "data_parallel_group") else None
    return dist.get_rank(group=group), dist.get_world_size(group=group)
