"""A plain PyTorch training script on lmforge's shards: what users compare `lmforge train` with.

    python -m bench.raw_train --config gpt2-124m --set data.path=[data/stdlib] --set train.max_steps=20

The config's model (with the shards' vocabulary), micro-batch and sequence length; torch.compile when
`train.compile` is on (as `lmforge train` does), autocast bf16 on a GPU, fused torch AdamW, clipping,
random windows of the shards' memmaps (bench.train_throughput's `raw` row, in a process of its own).
Prints `step N loss L` after every step (reading the loss waits for it): bench.startup_time's `raw` row
times its first such line.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace

import torch

from bench.train_throughput import raw_batches, run_baseline, with_data_vocab
from lmforge.errors import LmforgeError, run_cli
from pretrain.config import load_pretrain_config, resolve_repo_path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="gpt2-124m")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args(argv)
    cfg = load_pretrain_config(args.config, args.set)
    train, shard_dir = cfg.train, resolve_repo_path(cfg.data.path[0])
    if not (shard_dir / "manifest.json").is_file():
        raise LmforgeError(f"data.path {shard_dir}: no manifest.json (make shards with `lmforge prep shards`)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = replace(with_data_vocab(cfg.model, shard_dir), max_seq_len=max(train.seq_len, cfg.model.max_seq_len))
    step, _ = run_baseline(config, set(), None, device, train.compile)
    next_batch = raw_batches(shard_dir, config.vocab_size, train.micro_batch_size, train.seq_len, device)
    for number in range(1, train.max_steps + 1):
        print(f"step {number} loss {float(step(next_batch())):.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
