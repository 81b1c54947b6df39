"""The largest Llama that trains on one GPU with ZeRO-3, CPU offload and activation checkpointing.

    python -m bench.max_model --presets llama-1b,llama-7b,llama-13b --host-limit-gib 128

Tries each size in turn through lmforge's engine (ds_configs/zero3_offload.json: optimizer and
parameters on the CPU, every block checkpointed), a few steps of micro-batch 1 at --seq-len, and
prints one table: parameters, tokens/s, peak GPU memory, peak host memory, and whether it fits
under --host-limit-gib of host RAM. `llama-13b` is defined here (Llama-2-13B's shape); the others
come from configs/.
"""
from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from lmforge.distributed import init_distributed, shutdown
from pretrain.config import load_pretrain_config, resolve_repo_path
from pretrain.ds_config import build_deepspeed_config
from pretrain.model import ModelConfig, Transformer

EXTRA = {"llama-13b": dict(arch="llama", n_layers=40, n_heads=40, d_model=5120, d_ff=13824, max_seq_len=4096)}


def model_config(preset: str) -> ModelConfig:
    if preset in EXTRA:
        return ModelConfig(vocab_size=32000, **EXTRA[preset])
    return load_pretrain_config(preset).model.with_vocab(32000)


def host_peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def try_preset(preset: str, args, device) -> dict:
    from pretrain.engine import build_engine, optimizer_step

    config = model_config(preset)
    train = replace(load_pretrain_config("llama-7b").train, micro_batch_size=1, seq_len=args.seq_len,
                    grad_accum_steps=1, max_steps=1000, warmup_steps=1)
    ds_config = build_deepspeed_config(resolve_repo_path(Path("ds_configs/zero3_offload.json")), train, 1,
                                       bf16_supported=device.type == "cuda")
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    model = Transformer(config)
    params = model.num_params()
    engine = build_engine(model, ds_config, 0.1, compile_model=False)
    tokens = torch.randint(0, 32000, (1, args.seq_len + 1), device=device)
    batch = [(tokens[:, :-1], tokens[:, 1:])]
    loss = optimizer_step(engine, batch)  # warm-up (DeepSpeedCPUAdam's first step, buffers)
    torch.cuda.synchronize()
    clock = time.perf_counter()
    for _ in range(args.steps):
        loss = optimizer_step(engine, batch)
    final = float(loss)
    seconds = (time.perf_counter() - clock) / args.steps
    result = {
        "preset": preset, "params_b": params / 1e9, "tokens_per_second": args.seq_len / seconds,
        "step_s": seconds, "loss": final, "gpu_peak_gb": torch.cuda.max_memory_allocated() / 1e9,
        "host_peak_gib": host_peak_gib(), "setup_s": clock - started,
    }
    del engine, model
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="llama-1b,llama-7b,llama-13b")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--host-limit-gib", type=float, default=128.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    info = init_distributed()
    rows = []
    for preset in args.presets.split(","):
        try:
            rows.append(try_preset(preset, args, info.device))
        except (torch.cuda.OutOfMemoryError, RuntimeError, MemoryError) as err:
            rows.append({"preset": preset, "error": f"{type(err).__name__}: {str(err)[:120]}"})
            gc.collect()
            torch.cuda.empty_cache()
        print(json.dumps(rows[-1]), flush=True)
    gpu = torch.cuda.get_device_name()
    print(f"ZeRO-3 + CPU offload (optimizer, params) + activation checkpointing, micro-batch 1 × {args.seq_len}, {gpu}")
    print(f"{'preset':<10} {'params':>8} {'tok/s':>8} {'step s':>7} {'GPU GB':>7} {'host GiB':>9}  fits {args.host_limit_gib:.0f} GiB host")
    for r in rows:
        if "error" in r:
            print(f"{r['preset']:<10} failed: {r['error']}")
            continue
        fits = "yes" if r["host_peak_gib"] <= args.host_limit_gib else "no"
        print(f"{r['preset']:<10} {r['params_b']:>7.2f}B {r['tokens_per_second']:>8.0f} {r['step_s']:>7.1f} "
              f"{r['gpu_peak_gb']:>7.1f} {r['host_peak_gib']:>9.1f}  {fits}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
