"""The run every supervised post-training verb (sft, reward, dpo) shares: config and data checked
before any process group exists, then one DeepSpeed engine trained by SupervisedLoop.

Each verb brings what differs: its data loader, the model it trains, the step that turns batches
into a loss, and the line it prints about its data.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch

from lmforge import distributed
from lmforge.distributed import DistributedInfo, launcher_world_size
from posttrain.config import load_posttrain_config
from posttrain.job import Job, build_initial, parse_args, prepare_job, start_ranks
from posttrain.lora import lora_report, with_lora


class TrainingStep(Protocol):
    def micro_loss(self, step: int, micro: int) -> torch.Tensor: ...

    def evaluate(self) -> dict[str, float]: ...


@dataclass(frozen=True)
class SupervisedVerb:
    name: str
    """The CLI verb, its default preset in configs/posttrain/ and its metrics prefix."""
    description: str
    load_data: Callable[[Job], Any]
    model_kind: type
    """Transformer, or ScalarHeadModel for a reward model."""
    make_step: Callable[[Job, Any, Any, DistributedInfo], TrainingStep]
    """(job, engine, data, info) -> the verb's step."""
    describe: Callable[[Job, Any], str]
    """(job, data) -> what the run trains on, printed once by rank 0."""


def run_supervised_verb(verb: SupervisedVerb, argv: Sequence[str] | None) -> int:
    from posttrain.loop import SupervisedLoop, print_summary
    from pretrain.engine import build_engine  # DeepSpeed only after every check passed

    args = parse_args(verb.name, verb.description, verb.name, argv)
    config = load_posttrain_config(args.config, args.set)
    job = prepare_job(config, launcher_world_size())
    data = verb.load_data(job)
    job, info = start_ranks(job, verb=verb.name)
    try:
        cfg = job.config
        model = with_lora(build_initial(cfg, verb.model_kind), cfg.lora, verb.name)
        engine = build_engine(model, job.ds_config, cfg.train.weight_decay, cfg.train.compile, cfg.train.decay_embeddings)
        step = verb.make_step(job, engine, data, info)
        loop = SupervisedLoop(job, engine, verb.name)
        if loop.step >= cfg.train.max_steps:
            if distributed.is_main():
                print(f"nothing to do: {cfg.run.dir} already at step {loop.step} ≥ train.max_steps = {cfg.train.max_steps}",
                      flush=True)
            return 0
        if distributed.is_main():
            print(f"{verb.name}: {verb.describe(job, data)}, {info.world_size} rank(s), run dir {cfg.run.dir}", flush=True)
        last = loop.run(step.micro_loss, step.evaluate)
        if cfg.lora.rank:
            last.update(lora_report(engine.module, engine.optimizer))
        print_summary(verb.name, loop.step, last)
    finally:
        distributed.shutdown()
    return 0
