"""Run by test_one_rank_zero.py (plain python for one rank, torchrun for two): builds lmforge's ZeRO-0
Trainer on the tiny preset, counts DeepSpeed's gradient all-reduces over 3 steps and prints JSON with
the engine's `enable_backward_allreduce`, the gradient norm of the last step, how often the steps walked
the module for its parameters and whether every gradient was cleared after the last step."""
from __future__ import annotations

import json
import sys

from lmforge import distributed
from pretrain.config import load_pretrain_config
from pretrain.train import Trainer, prepare


def main(argv: list[str]) -> int:
    config = load_pretrain_config("tiny", [item for item in argv if item != "--set"])
    info = distributed.init_distributed()
    trainer = Trainer(prepare(config, info.world_size, verify_checksums=False), info)
    engine = trainer.engine
    calls = {"allreduce": 0}
    original = engine.buffered_allreduce_fallback

    def counted(*args, **kwargs):
        calls["allreduce"] += 1
        return original(*args, **kwargs)

    engine.buffered_allreduce_fallback = counted
    module, walks = engine.module, {"count": 0}
    walk = module.named_parameters

    def counted_walk(*args, **kwargs):
        walks["count"] += 1
        return walk(*args, **kwargs)

    module.named_parameters = counted_walk
    for _ in range(3):
        trainer.train_step()
    trainer.guarded.settle()
    cleared = all(param.grad is None for _, param in walk())
    if trainer.batches is not None:
        trainer.batches.close()
    if distributed.is_main():
        print(json.dumps({"world": info.world_size, "enable_backward_allreduce": engine.enable_backward_allreduce,
                          "allreduces": calls["allreduce"], "grad_norm": float(trainer.guarded.last_grad_norm),
                          "module_walks": walks["count"], "grads_cleared": cleared}))
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
