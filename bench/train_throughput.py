"""Training throughput on one GPU: a raw-PyTorch baseline against lmforge's DeepSpeed path.

    python -m bench.train_throughput --preset gpt2-124m --batch 16 --seq-len 1024 \
        --variants baseline,zero0,zero1,zero2,zero3 --json results.json

Every variant trains the same model (same preset, weights seed, batch and sequence length) on
random tokens, in this one process, one after another. Timing uses CUDA events over --steps
steps after --warmup steps (compilation happens during warm-up). Prints one table: tokens/s,
MFU (flops per token from pretrain.model over 989 TFLOP/s dense bf16), peak memory, and the
ratio to the baseline. `--dry-run` runs the tiny preset for two steps on whatever device there is
(CI uses it so this script cannot rot).

Variant names: `baseline` (what raw PyTorch gives: the same architecture with the tokenizer's
vocabulary size, torch.compile + autocast bf16 + fused torch AdamW, a plain loop; `baseline:padded`
pads the vocabulary to a multiple of 128 as lmforge does), and
`zeroN[:option+option]` for lmforge's path through pretrain.engine with ds_configs/zeroN.json,
where options are `ckpt` (activation checkpointing on every block), `bf16` (DeepSpeed's
bf16 mode with bf16 weights instead of the shipped torch_autocast over fp32 weights), `eager` (no compile),
`enginecompile` (DeepSpeed's engine.compile() instead of compiling the model first), `persist`
(ZeRO-3 keeps every parameter resident), `nooverlap` (overlap_comm off), `immediate` (bf16
immediate_grad_update), `deepcompile` (DeepSpeed's DeepCompile through engine.compile()),
`bigbucket` (500M-element reduce/allgather buckets).
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from lmforge.distributed import init_distributed
from pretrain.config import load_pretrain_config, resolve_repo_path
from pretrain.ds_config import build_deepspeed_config
from pretrain.model import ModelConfig, Transformer, flops_per_token

H100_PEAK_BF16 = 989e12
VOCAB = {"gpt2": 50257, "llama": 32000}


@dataclass
class Result:
    variant: str
    tokens_per_second: float
    mfu: float
    step_ms: float
    peak_memory_gb: float
    ratio_to_baseline: float | None = None
    note: str = ""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2-124m")
    parser.add_argument("--batch", type=int, default=16, help="micro-batch (sequences per step)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=8, help="untimed steps first (compilation)")
    parser.add_argument("--variants", default="baseline,zero0,zero1,zero2,zero3")
    parser.add_argument("--json", type=Path, default=None, help="also write the table here")
    parser.add_argument("--dry-run", action="store_true", help="tiny preset, 2 steps, any device")
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler's top ops per variant")
    return parser.parse_args(argv)


def model_config(preset: str, seq_len: int) -> ModelConfig:
    config = load_pretrain_config(preset).model
    return config.with_vocab(VOCAB[config.arch]) if config.vocab_size is None else config


def random_batches(vocab: int, batch: int, seq_len: int, device, count: int = 4):
    gen = torch.Generator(device="cpu").manual_seed(0)
    data = [torch.randint(0, vocab, (batch, seq_len + 1), generator=gen) for _ in range(count)]
    return [(d[:, :-1].to(device), d[:, 1:].to(device)) for d in data]


def timed(step_fn, batches, warmup: int, steps: int, device) -> float:
    """Seconds per step, measured with CUDA events (host clock after a sync on CPU)."""
    for i in range(warmup):
        step_fn(batches[i % len(batches)])
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(steps):
            loss = step_fn(batches[i % len(batches)])
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1000
    else:
        clock = time.perf_counter()
        for i in range(steps):
            loss = step_fn(batches[i % len(batches)])
        float(loss)
        seconds = time.perf_counter() - clock
    if not torch.isfinite(loss).all():
        raise RuntimeError("loss is not finite")
    return seconds / steps


def run_baseline(config: ModelConfig, options: set[str], args, device, compile_model: bool):
    torch.manual_seed(0)
    if "padded" not in options:  # raw PyTorch keeps the tokenizer's vocabulary size (50,257 for GPT-2)
        config = replace(config, pad_vocab_to_multiple=1)
    model = Transformer(config).to(device)
    if compile_model:
        model.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                  fused=device.type == "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def step(batch):
        inputs, targets = batch
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            loss = model(inputs, targets)  # the loss is inside the compiled graph, as nanoGPT does
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step, (model, optimizer)


def lmforge_ds_config(stage: int, options: set[str], args, device) -> dict:
    train = replace(load_pretrain_config(args.preset).train, micro_batch_size=args.batch, seq_len=args.seq_len,
                    grad_accum_steps=1, max_steps=10_000, warmup_steps=10)
    ds_config = build_deepspeed_config(resolve_repo_path(Path(f"ds_configs/zero{stage}.json")), train, 1,
                                       bf16_supported=device.type == "cuda")
    if "bf16" in options and device.type == "cuda":  # DeepSpeed's bf16 mode instead of the shipped autocast
        ds_config["torch_autocast"] = {"enabled": False}
        ds_config["bf16"] = {"enabled": True}
    if "ckpt" in options:
        ds_config["activation_checkpointing"] = {"partition_activations": False, "cpu_checkpointing": False}
    zero = ds_config.setdefault("zero_optimization", {})
    if "persist" in options:  # one rank holds every parameter anyway: keep them all resident
        zero["stage3_param_persistence_threshold"] = 10**12
    if "nooverlap" in options:
        zero["overlap_comm"] = False
    if "deepcompile" in options:
        ds_config["compile"] = {"deepcompile": True}
    if "bigbucket" in options:
        zero.update(reduce_bucket_size=500_000_000, allgather_bucket_size=500_000_000)
    if "immediate" in options and ds_config.get("bf16", {}).get("enabled"):
        ds_config["bf16"]["immediate_grad_update"] = True
    return ds_config


def run_lmforge(config: ModelConfig, stage: int, options: set[str], args, device, compile_model: bool):
    from pretrain.engine import build_engine, optimizer_step

    torch.manual_seed(0)
    model = Transformer(config)
    ds_config = lmforge_ds_config(stage, options, args, device)
    engine = build_engine(model, ds_config, 0.1, compile_model and not options & {"eager", "enginecompile"})
    if compile_model and "enginecompile" in options:
        engine.compile()

    def step(batch):
        return optimizer_step(engine, [batch])

    return step, (engine, model)


def measure(variant: str, config: ModelConfig, args, device, compile_model: bool) -> Result:
    name, _, opts = variant.partition(":")
    options = set(filter(None, opts.split("+")))
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if name == "baseline":
        step, keep = run_baseline(config, options, args, device, compile_model)
    elif name.startswith("zero"):
        step, keep = run_lmforge(config, int(name[4:]), options, args, device, compile_model)
    else:
        raise SystemExit(f"error: unknown variant '{variant}' (baseline, zero0..zero3[:ckpt+autocast+eager])")
    batches = random_batches(config.vocab_size, args.batch, args.seq_len, device)
    seconds = timed(step, batches, args.warmup, args.steps, device)
    if args.profile:
        print_profile(variant, step, batches, device)
    tokens_per_second = args.batch * args.seq_len / seconds
    peak = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else 0.0
    mfu = tokens_per_second * flops_per_token(config, args.seq_len) / H100_PEAK_BF16
    del step, keep
    gc.collect()
    return Result(variant, tokens_per_second, mfu, seconds * 1000, peak)


def print_profile(variant: str, step, batches, device) -> None:
    """Top operators by self device and self host time over 5 steps, and the host-sync count."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for i in range(5):
            step(batches[i % len(batches)])
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"--- profile {variant} (5 steps) by device time")
    print(events.table(sort_by=sort, row_limit=18, max_name_column_width=60))
    print(f"--- profile {variant} by host time")
    print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))
    syncs = {e.key: e.count for e in events if "Synchronize" in e.key or e.key in ("aten::item", "aten::_local_scalar_dense")}
    print(f"--- host syncs in 5 steps: {syncs}")


def print_table(results: list[Result], header: str) -> None:
    print(header)
    print(f"{'variant':<22} {'tok/s':>10} {'MFU':>6} {'step ms':>8} {'peak GB':>8} {'× baseline':>10}  note")
    for r in results:
        ratio = f"{r.ratio_to_baseline:.3f}" if r.ratio_to_baseline is not None else "-"
        print(f"{r.variant:<22} {r.tokens_per_second:>10.0f} {r.mfu:>6.1%} {r.step_ms:>8.1f} {r.peak_memory_gb:>8.2f} {ratio:>10}  {r.note}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        args.preset, args.batch, args.seq_len, args.steps, args.warmup = "tiny", 2, 32, 2, 1
    info = init_distributed()
    device = info.device
    compile_model = device.type == "cuda" and not args.dry_run
    config = model_config(args.preset, args.seq_len)
    results: list[Result] = []
    for variant in args.variants.split(","):
        try:
            results.append(measure(variant, config, args, device, compile_model))
        except torch.cuda.OutOfMemoryError:
            results.append(Result(variant, 0.0, 0.0, 0.0, 0.0, note="out of memory"))
            gc.collect()
            torch.cuda.empty_cache()
        print(f"measured {variant}: {results[-1].tokens_per_second:.0f} tok/s", flush=True)
    base = next((r.tokens_per_second for r in results if r.variant == "baseline" and r.tokens_per_second), None)
    for r in results:
        r.ratio_to_baseline = r.tokens_per_second / base if base else None
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    with torch.device("meta"):
        params = Transformer(config).num_params()
    header = (f"{args.preset}: batch {args.batch} × seq {args.seq_len}, {gpu}, torch {torch.__version__}, "
              f"{params / 1e6:.1f}M params")
    print_table(results, header)
    if args.json:
        args.json.write_text(json.dumps({"header": header, "results": [asdict(r) for r in results]}, indent=2))
    from lmforge.distributed import shutdown

    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
