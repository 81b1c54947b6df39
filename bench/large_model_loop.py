"""A few steps of lmforge's real training loop on a large preset: tok/s, MFU, GPU and host peaks.

    python -m bench.large_model_loop llama-7b 5 deepspeed.config=ds_configs/zero0.json train.micro_batch_size=1 \
        train.grad_accum_steps=16 train.compile=true train.compile_scope=blocks

Runs `pretrain.train.Trainer.run` (what `lmforge train` runs) for STEPS optimizer steps of PRESET with
the given `section.key=value` overrides, logging every step, without writing a checkpoint (and so without
the disk-space check for one: a 7B checkpoint is 108 GB). Prints each step and one `RESULT {json}` line:
parameters, tokens per optimizer step, median tok/s and MFU of steps 2+, GPU peak (allocated and
reserved), host peak RSS and host bytes per parameter, setup seconds. docs/performance.md has the table.
"""
from __future__ import annotations

import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

import pretrain.run_checks as run_checks
from lmforge.distributed import init_distributed, shutdown
from pretrain.config import load_pretrain_config
from pretrain.train import Trainer, prepare

GIB = 2**30


def host_peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    preset, steps, *sets = argv
    started = time.perf_counter()
    run_dir = tempfile.mkdtemp(prefix="large-model-loop-")
    config = load_pretrain_config(preset, [f"run.dir={run_dir}", f"train.max_steps={steps}", "train.save_interval=0",
                                           "train.eval_interval=0", "run.log_interval=1", "run.progress_bar=false",
                                           "run.tensorboard=false", "train.warmup_steps=1", *sets])
    run_checks.disk_space_problem = lambda *a, **k: (None, None)  # no checkpoint is written here
    trainer = Trainer(prepare(config, 1, verify_checksums=False), init_distributed())
    trainer.save = lambda: "not written"
    setup = time.perf_counter() - started
    cuda = torch.cuda.is_available()
    print(f"built in {setup:.1f}s, host peak {host_peak_gib():.1f} GiB", flush=True)
    trainer.run()
    lines = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in lines if "tokens_per_second" in r]
    for r in timed:
        print(f"step {r['step']} loss {r['loss']:.3f} tok/s {r['tokens_per_second']:.0f} mfu {r['mfu']}", flush=True)
    later = [r for r in timed if r["step"] > 1] or timed
    rates, mfus = sorted(r["tokens_per_second"] for r in later), sorted((r["mfu"] or 0.0) for r in later)
    params = sum(getattr(p, "ds_numel", p.numel()) for p in {id(p): p for p in trainer.model.parameters()}.values())
    host = host_peak_gib()
    print("RESULT", json.dumps({
        "preset": preset, "sets": sets, "params_b": params / 1e9, "tokens_per_step": trainer.tokens_per_step,
        "tok_s_median": rates[len(rates) // 2], "mfu_median": mfus[len(mfus) // 2],
        "gpu_peak_gib": torch.cuda.max_memory_allocated() / GIB if cuda else None,
        "gpu_reserved_gib": torch.cuda.max_memory_reserved() / GIB if cuda else None,
        "host_peak_gib": host, "host_bytes_per_param": host * GIB / params, "setup_s": setup,
        "total_s": time.perf_counter() - started}), flush=True)
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
