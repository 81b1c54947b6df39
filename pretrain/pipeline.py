"""Pipeline parallelism: the same Transformer as DeepSpeed pipeline layers, with its checks and numbers.

`parallel.pipeline_stages: P` hands the modules of one `pretrain.model.Transformer` (no second
model definition) to `deepspeed.pipe.PipelineModule` as a list of layers, in the order data flows:

| layer      | class            | wraps                                   | in -> out                      |
| ---------- | ---------------- | --------------------------------------- | ------------------------------ |
| 0          | TokenEmbedding   | embed (TiedLayerSpec "embed" if tied)   | tokens -> x                    |
| 1          | Positions        | pos_embed (gpt2), drop                  | x -> x                         |
| 2 .. L+1   | BlockLayer       | blocks[i]; RoPE slices recomputed       | x -> x                         |
| L+2        | FinalNorm        | final_norm                              | x -> x                         |
| L+3        | LmHead           | lm_head, or the tied embedding's weight | x -> logits (padded vocab)     |

and the loss is `Transformer.forward`'s: mean token cross-entropy over the padded vocab. Each
wrapper keeps the Transformer's attribute names, so the layer files of a checkpoint map back to
the plain model by index alone (pretrain/pipeline_checkpoint.py). World = P x DP: DeepSpeed's
topology puts the P stages of one pipeline on consecutive ranks' columns and runs ZeRO-0/1 data
parallelism across the DP replicas of each stage; micro-batches are gradient accumulation steps.

`configure_pipeline` is the merge point of the `parallel` section into DeepSpeed's JSON (its own
`pipeline` section: stages, partition) and checks a layout before any process group exists.
"""
from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.errors import LmforgeError
from pretrain.activation_checkpointing import checkpoint_function
from parallel.config import ParallelConfig
from pretrain.ds_config import activation_checkpoint_every, with_pipeline, zero_stage_of
from pretrain.model import Block, ModelConfig, Transformer, token_cross_entropy

FIRST_BLOCK_LAYER = 2
"""Index of blocks[0] in the layer list (after TokenEmbedding and Positions)."""
TIED_KEY = "embed"
# DeepSpeed's partition_method for ours: "uniform" balances transformer blocks, not all layers.
DEEPSPEED_PARTITION = {"parameters": "parameters", "uniform": "type:BlockLayer"}


# ----------------------------------------------------------------------------- layers

class TokenEmbedding(nn.Module):
    def __init__(self, embed: nn.Embedding):
        super().__init__()
        self.embed = embed

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed(tokens)


def tied_head(embedding: TokenEmbedding, hidden: torch.Tensor) -> torch.Tensor:
    """The last stage's use of the tied module: logits with the embedding matrix."""
    return F.linear(hidden, embedding.embed.weight)


class Positions(nn.Module):
    """Learned positions (gpt2) and embedding dropout; Llama's positions are RoPE, in each block."""

    def __init__(self, pos_embed: nn.Embedding | None, drop: nn.Module):
        super().__init__()
        self.pos_embed = pos_embed
        self.drop = drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pos_embed is not None:
            x = x + self.pos_embed(torch.arange(x.shape[1], device=x.device))
        return self.drop(x)


class BlockLayer(nn.Module):
    """One block taking and returning a tensor: pipeline stages pass nothing but activations."""

    def __init__(self, block: Block, rope_cos: torch.Tensor | None, rope_sin: torch.Tensor | None):
        super().__init__()
        self.block = block
        self.register_buffer("rope_cos", rope_cos, persistent=False)
        self.register_buffer("rope_sin", rope_sin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        rope = None if self.rope_cos is None else (self.rope_cos[:length], self.rope_sin[:length])
        return self.block(x, rope)


class FinalNorm(nn.Module):
    def __init__(self, final_norm: nn.Module):
        super().__init__()
        self.final_norm = final_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_norm(x)


class LmHead(nn.Module):
    def __init__(self, lm_head: nn.Linear):
        super().__init__()
        self.lm_head = lm_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(x)


def mean_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The training loss of Transformer.forward: mean fp32 cross-entropy over the padded vocab."""
    return token_cross_entropy(logits, targets).mean()


def pipeline_layers(model: Transformer) -> list:
    """The model's modules as PipelineModule layers (module instances; TiedLayerSpecs if tied)."""
    from deepspeed.pipe import TiedLayerSpec

    rope_cos, rope_sin = getattr(model, "rope_cos", None), getattr(model, "rope_sin", None)
    if model.config.tied:
        first = TiedLayerSpec(TIED_KEY, TokenEmbedding, model.embed, tied_weight_attr="embed.weight")
        last = TiedLayerSpec(TIED_KEY, TokenEmbedding, model.embed, forward_fn=tied_head, tied_weight_attr="embed.weight")
    else:
        first, last = TokenEmbedding(model.embed), LmHead(model.lm_head)
    blocks = [BlockLayer(block, rope_cos, rope_sin) for block in model.blocks]
    return [first, Positions(model.pos_embed, model.drop), *blocks, FinalNorm(model.final_norm), last]


# ----------------------------------------------------------------------------- partition

def _layer_modules(layer) -> nn.Module | None:
    from deepspeed.pipe import LayerSpec

    return layer.build() if isinstance(layer, LayerSpec) else layer if isinstance(layer, nn.Module) else None


def _layer_weights(layers: list, method: str) -> list[int]:
    """What DeepSpeed's PipelineModule balances: trainable parameters per layer, or 1 per block."""
    if method == "parameters":
        modules = [_layer_modules(layer) for layer in layers]
        return [0 if m is None else sum(p.numel() for p in m.parameters() if p.requires_grad) for m in modules]
    pattern = re.compile(method.split(":", 1)[1], re.IGNORECASE)
    names = [layer.typename.__name__ if hasattr(layer, "typename") else type(layer).__name__ for layer in layers]
    return [1 if pattern.search(name) else 0 for name in names]


def stage_bounds(layers: list, stages: int, method: str) -> list[int]:
    """Layer index where each stage starts (plus the end), exactly as PipelineModule partitions."""
    from deepspeed.runtime import utils as ds_utils

    return [int(b) for b in ds_utils.partition_balanced(weights=_layer_weights(layers, method), num_parts=stages)]


def _stage_problem(config: ModelConfig, stages: int, method: str) -> str | None:
    with torch.device("meta"):
        layers = pipeline_layers(Transformer(config))
    bounds = stage_bounds(layers, stages, DEEPSPEED_PARTITION[method])
    blocks = [sum(isinstance(_layer_modules(l), BlockLayer) for l in layers[a:b]) for a, b in zip(bounds, bounds[1:])]
    if min(blocks) > 0:
        return None
    empty = blocks.index(0)
    return (f"parallel.partition_method = {method} gives stage {empty} of {stages} no transformer block "
            f"(blocks per stage: {blocks}); set parallel.partition_method = uniform or use fewer stages")


# ----------------------------------------------------------------------------- config and checks

def pipeline_stages_of(ds_config: dict[str, Any]) -> int:
    """P from DeepSpeed's `pipeline.stages` (its default "auto": no pipeline, 1)."""
    stages = ds_config.get("pipeline", {}).get("stages", "auto")
    return 1 if stages in ("auto", None) else int(stages)


def data_parallel_size(parallel: ParallelConfig, world_size: int) -> int:
    """Data-parallel replicas: world / (P × tensor × sequence degrees) (the whole world where that does
    not divide it; parallel.degrees.degree_problems says so). Ranks of one tensor- or sequence-parallel
    group read the same samples."""
    split = max(parallel.pipeline_stages, 1) * max(parallel.tensor, 1) * max(parallel.sequence, 1)
    return world_size // split if world_size % split == 0 else world_size


def pipeline_problems(ds_config: dict[str, Any], parallel: ParallelConfig, model: ModelConfig, world_size: int) -> list[str]:
    """Every reason the layout cannot run, one line each (nothing for one stage and a JSON that agrees)."""
    stages, found = parallel.pipeline_stages, []
    section = ds_config.get("pipeline", {})
    if section.get("stages", "auto") not in ("auto", None, stages):
        found.append(f"deepspeed.config: pipeline.stages = {section['stages']!r} contradicts parallel.pipeline_stages = "
                     f"{stages}; remove it from the JSON or make them agree")
    if stages <= 1:
        return found
    if world_size % stages:
        found.append(f"parallel.pipeline_stages = {stages} does not divide the {world_size} rank(s) launched: "
                     f"ranks = pipeline stages x data-parallel replicas, so launch a multiple of {stages} ranks")
    if zero_stage_of(ds_config) > 1:
        found.append(f"deepspeed.config: zero_optimization.stage = {zero_stage_of(ds_config)} with parallel.pipeline_stages = "
                     f"{stages}: DeepSpeed's pipeline engine supports ZeRO stage 0 or 1 (e.g. ds_configs/zero1.json)")
    if stages > model.n_layers:
        found.append(f"parallel.pipeline_stages = {stages} exceeds model.n_layers = {model.n_layers}: "
                     "every stage needs at least one transformer block")
    elif model.vocab_size:
        problem = _stage_problem(model, stages, parallel.partition_method)
        if problem:
            found.append(problem)
    return found


def configure_pipeline(ds_config: dict[str, Any], parallel: ParallelConfig, model: ModelConfig, world_size: int) -> dict[str, Any]:
    """ds_config with DeepSpeed's `pipeline` section filled from `parallel` (unchanged for one stage).

    `ds_config` must have been built for `data_parallel_size(parallel, world_size)` replicas.
    Raises one LmforgeError naming every problem: P not dividing the world, more stages than
    blocks or a partition that leaves a stage without one, ZeRO-2/3, a contradicting JSON.
    """
    problems = pipeline_problems(ds_config, parallel, model, world_size)
    if problems:
        raise LmforgeError("; ".join(problems))
    if parallel.pipeline_stages <= 1:
        return ds_config
    return with_pipeline(ds_config, parallel.pipeline_stages, DEEPSPEED_PARTITION[parallel.partition_method])


# ----------------------------------------------------------------------------- metrics

def bubble_fraction(stages: int, micro_batches: int) -> float:
    """Idle share of a 1F1B pipeline step: (P - 1) / (M + P - 1) for P stages and M micro-batches."""
    return (stages - 1) / (micro_batches + stages - 1)


def pipeline_metrics(ds_config: dict[str, Any]) -> dict[str, Any]:
    """Extra metric-line fields of a pipelined run ({} without a pipeline)."""
    stages = pipeline_stages_of(ds_config)
    if stages <= 1:
        return {}
    micro_batches = int(ds_config["gradient_accumulation_steps"])
    return {"pipeline_stages": stages, "bubble_fraction": bubble_fraction(stages, micro_batches)}


# ----------------------------------------------------------------------------- engine side

def release_other_stages(model: Transformer, local: nn.Module) -> None:
    """Turns the parameters this stage does not hold into meta tensors (shapes kept: num_params stays right)."""
    keep = {id(p) for p in local.parameters()}
    replaced: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None or id(param) in keep:
                continue
            if id(param) not in replaced:  # a tied head shares its embedding's parameter
                replaced[id(param)] = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)
            module._parameters[name] = replaced[id(param)]


def _pipeline_module_class():
    from deepspeed.pipe import PipelineModule

    class TransformerPipe(PipelineModule):
        """DeepSpeed's PipelineModule, with the tied weights broadcast outside autograd.

        DeepSpeed broadcasts them in place at start and after loading a checkpoint; recorded
        by autograd, that broadcast makes every backward warn that it has no autograd kernel.
        """

        @torch.no_grad()
        def _synchronize_tied_weights(self):
            super()._synchronize_tied_weights()

    return TransformerPipe


def build_pipeline_module(model: Transformer, ds_config: dict[str, Any]):
    """This rank's stage of the model: a PipelineModule over the model's own modules.

    Needs the process group. Activation checkpointing: DeepSpeed's interval (pipeline JSON's
    activation_checkpoint_interval, else pretrain.ds_config.activation_checkpoint_every) counts
    consecutive blocks of one stage, recomputed together in backward.
    """
    section = ds_config["pipeline"]
    interval = section.get("activation_checkpoint_interval") or activation_checkpoint_every(ds_config, model.config.n_layers) or 0
    layers = pipeline_layers(model)
    module = _pipeline_module_class()(
        layers, num_stages=pipeline_stages_of(ds_config), loss_fn=mean_token_loss,
        partition_method=section["partition"], activation_checkpoint_interval=interval,
        activation_checkpoint_func=checkpoint_function(ds_config), checkpointable_layers=["BlockLayer"],
    )
    assert list(module.parts) == stage_bounds(layers, module.num_stages, section["partition"]), "preflight partition differs"
    release_other_stages(model, module)
    return module
