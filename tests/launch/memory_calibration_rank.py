"""One rank of the memory calibration (run by torchrun): builds a Llama under ZeRO-3 + zero.Init with the
optimizer offloaded, trains a few steps and prints `{"baseline": RSS after imports, "peak": ru_maxrss}` in bytes.

    torchrun --nproc_per_node 2 tests/launch/memory_calibration_rank.py --layers 4 --d-model 512 --steps 2
"""
from __future__ import annotations

import argparse
import json
import resource
from pathlib import Path

import torch

from lmforge.distributed import init_distributed, shutdown
from pretrain.ds_config import build_deepspeed_config
from pretrain.engine import build_engine, optimizer_step
from pretrain.engine import build_model
from tests.launch.memory_calibration import calibration_configs


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, required=True)
    parser.add_argument("--d-model", type=int, required=True)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    info = init_distributed()
    model_config, train, json_path = calibration_configs(args.layers, args.d_model)
    ds_config = build_deepspeed_config(json_path, train, info.world_size, False)
    baseline = rss_bytes()
    model = build_model(model_config, ds_config)
    engine = build_engine(model, ds_config, train.weight_decay, compile_model=False)
    tokens = torch.randint(0, model_config.vocab_size, (train.micro_batch_size, train.seq_len + 1))
    for _ in range(args.steps):
        loss = optimizer_step(engine, [(tokens[:, :-1], tokens[:, 1:])])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    record = {"rank": info.rank, "baseline": baseline, "peak": peak, "loss": float(loss),
              "params": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())}
    (args.out / f"rank{info.rank}.json").write_text(json.dumps(record))
    shutdown()


if __name__ == "__main__":
    main()
