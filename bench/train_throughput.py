"""Training throughput on one GPU: raw PyTorch against lmforge's real training loop and its engine.

    python -m bench.train_throughput --preset gpt2-124m --batch 16 --seq-len 1024 --data data/stdlib \
        --variants raw,loop:zero0,loop:zero1,loop:zero2,loop:zero3,baseline,zero1 --json results.json

Every variant trains the same model (same preset, weights seed, batch and sequence length), in this
one process, one after another. `raw` and `loop:*` read the shards of --data; the others random
tokens. The table's ratio column is to the first `raw` row (else the first `baseline` row). Timing uses CUDA events over --steps
steps after --warmup steps (compilation happens during warm-up). Prints one table: tokens/s,
MFU (flops per token from pretrain.model over 989 TFLOP/s dense bf16), peak memory, and the
ratio to the baseline. `--dry-run` runs the tiny preset for two steps on whatever device there is
(CI uses it so this script cannot rot).

Variant names: `raw` (a plain PyTorch training script on the same shards: random windows of a
numpy memmap copied through pinned memory, torch.compile + autocast bf16 + fused torch AdamW +
clipping, the loss read every 10 steps: what users compare lmforge with), `loop:NAME` (lmforge's
`pretrain.train.Trainer.run` with ds_configs/NAME.json: the loop `lmforge train` runs, with its
batch prefetcher, step guard, logging and metrics; tokens/s is the median of its logged intervals
after the warm-up), `baseline` (what raw PyTorch gives: the same architecture with the tokenizer's
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
import traceback
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
    parser.add_argument("--variants", default="raw,loop:zero0,loop:zero1,loop:zero2,loop:zero3,baseline")
    parser.add_argument("--data", type=Path, default=Path("data/stdlib"), help="shard directory for raw and loop:* variants")
    parser.add_argument("--json", type=Path, default=None, help="also write the table here")
    parser.add_argument("--dry-run", action="store_true", help="tiny preset, 2 steps, any device")
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler's top ops per variant")
    parser.add_argument("--trace", type=Path, default=None,
                        help="raw and loop:* rows: write a Chrome trace of 5 steps (with Python stacks) here, and its summary (bench/trace_summary.py)")
    parser.add_argument("--find-syncs", action="store_true",
                        help="loop:* variants: list every host-GPU synchronisation in 3 steps after the warm-up (file:line, count)")
    return parser.parse_args(argv)


def model_config(preset: str, seq_len: int, data: Path | None = None) -> ModelConfig:
    """The preset's model with the vocabulary of --data's tokenizer (a real-data run), else GPT-2's/Llama's."""
    return with_data_vocab(load_pretrain_config(preset).model, data)


def with_data_vocab(config: ModelConfig, data: Path | None) -> ModelConfig:
    """`config` with the vocabulary of `data`'s tokenizer (its manifest), else GPT-2's/Llama's; a set one stays."""
    if config.vocab_size is not None:
        return config
    if data is not None and (data / "manifest.json").is_file():
        return config.with_vocab(int(json.loads((data / "manifest.json").read_text())["tokenizer"]["vocab_size"]))
    return config.with_vocab(VOCAB[config.arch])


def uses_data(variants: list[str]) -> bool:
    return any(v == "raw" or v.startswith("loop:") for v in variants)


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


def memmap_windows(shard_dir: Path, vocab_size: int):
    """The train shards of a manifest as one numpy memmap each (the raw script's data)."""
    import numpy as np

    manifest = json.loads((shard_dir / "manifest.json").read_text())
    dtype = np.uint16 if vocab_size < 2**16 else np.int32
    return [np.memmap(shard_dir / f"{s['path']}.bin", dtype=dtype, mode="r") for s in manifest["shards"] if s["split"] == "train"]


def raw_batches(shard_dir: Path, vocab_size: int, batch: int, seq_len: int, device):
    """The raw script's batches: a function returning (inputs, targets) of `batch` random windows of
    `seq_len + 1` tokens from the train shards' memmaps, copied to `device` through pinned memory (seed 0)."""
    import numpy as np

    shards = memmap_windows(shard_dir, vocab_size)
    rng = np.random.default_rng(0)

    def next_batch():
        shard = shards[rng.integers(len(shards))]
        starts = rng.integers(0, len(shard) - seq_len - 1, batch)
        rows = torch.from_numpy(np.stack([shard[i:i + seq_len + 1] for i in starts]).astype(np.int64))
        if device.type == "cuda":
            rows = rows.pin_memory().to(device, non_blocking=True)
        return rows[:, :-1], rows[:, 1:]

    return next_batch


def measure_raw(config: ModelConfig, args, device, compile_model: bool) -> float:
    """Seconds per step of a plain PyTorch script on the shards, timed like the loop (host clock
    between loss reads, median over intervals of 10 steps after the warm-up)."""
    step, _ = run_baseline(replace(config, pad_vocab_to_multiple=1), {"padded"}, args, device, compile_model)
    batch = raw_batches(args.data, config.vocab_size, args.batch, args.seq_len, device)
    interval, times, clock = (10 if not args.dry_run else 1), [], None
    if args.trace and device.type == "cuda":
        step = _step_profiler(step, range(args.warmup + 5, args.warmup + 10), "raw", args.trace)
    for i in range(args.warmup + args.steps):
        loss = step(batch())
        if (i + 1) % interval == 0 or i + 1 == args.warmup:
            float(loss)  # what a training script logs
            now = time.perf_counter()
            if clock is not None and i + 1 > args.warmup:
                times.append((now - clock) / interval)
            clock = now if i + 1 >= args.warmup else None
    return sorted(times)[len(times) // 2] if times else float("nan")


def measure_loop(config: ModelConfig, json_name: str, args, device, compile_model: bool):
    """(seconds per step, input seconds per step, (step, loss) of the last logged step, seconds per step the host
    waited for the GPU) of lmforge's Trainer.run on the shards: the median logged interval after the warm-up.

    `json_name` is a ds_configs/ stem, optionally followed by `:SET+SET` overrides of the config
    (e.g. `zero0:train.compile_scope=blocks`)."""
    row = json_name  # the whole row name: two rows of one JSON keep their own profile and trace
    json_name, _, extra = json_name.partition(":")
    import tempfile

    from lmforge.distributed import init_distributed as _init
    from pretrain.train import Trainer, prepare

    interval = 10 if not args.dry_run else 1
    warmup = max(interval, -(-args.warmup // interval) * interval)
    with tempfile.TemporaryDirectory() as run_dir:
        sets = [f"run.dir={run_dir}", f"data.path=[{args.data}]", f"deepspeed.config=ds_configs/{json_name}.json",
                f"train.micro_batch_size={args.batch}", f"train.seq_len={args.seq_len}", "train.grad_accum_steps=1",
                f"train.max_steps={warmup + max(args.steps, 2 * interval)}", f"train.warmup_steps={min(10, warmup)}", "train.eval_interval=0",
                "train.save_interval=0", f"train.compile={str(compile_model).lower()}", f"run.log_interval={interval}",
                "run.progress_bar=false", "run.tensorboard=false", f"model.max_seq_len={max(args.seq_len, config.max_seq_len)}"]
        sets += [item for item in extra.split("+") if item]
        cfg = load_pretrain_config(args.preset, sets)
        trainer = Trainer(prepare(cfg, 1, verify_checksums=False), _init())
        trainer.save = lambda: None  # the benchmark times training steps, not checkpoint writes
        if args.find_syncs and device.type == "cuda":
            trainer.train_step = _sync_finder(trainer.train_step, range(warmup + 1, warmup + 4), row)
        if (args.profile or args.trace) and device.type == "cuda":
            trainer.train_step = _step_profiler(trainer.train_step, range(warmup + 5, warmup + 10), row, args.trace)
        input_seconds = _time_input_pipeline(trainer)
        waits = _time_gpu_waits(trainer)
        trainer.run()
        lines = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
        del trainer
    rates = sorted(r["tokens_per_second"] for r in lines if "tokens_per_second" in r and r["step"] > warmup)
    inputs = sorted(input_seconds[warmup:]) or [float("nan")]
    timed_waits = [seconds for step, seconds in waits.items() if step > warmup] or [float("nan")]
    last = [r for r in lines if "loss" in r][-1]  # same seed and batches in every loop row: equal kernels, equal loss
    return (args.batch * args.seq_len / rates[len(rates) // 2], inputs[len(inputs) // 2], (last["step"], last["loss"]),
            sum(timed_waits) / len(timed_waits))


def _time_gpu_waits(trainer) -> dict[int, float]:
    """Per step number, the host's seconds waiting for the GPU to finish that step (the step guard reads
    its flags a step late, and at every log line): near 0 when the host is the bottleneck."""
    waits: dict[int, float] = {}
    resolve = trainer.guarded._resolve

    def timed_resolve(pending):
        clock = time.perf_counter()
        if pending.ready is not None:
            pending.ready.synchronize()
        waits[pending.step_number] = time.perf_counter() - clock
        return resolve(pending)

    trainer.guarded._resolve = timed_resolve
    return waits


def _time_input_pipeline(trainer) -> list[float]:
    """Per step, the main thread's seconds in taking batches and copying them to the device
    (`BatchPrefetcher.next` and `Trainer._to_device`): the input pipeline's cost on the step."""
    per_step: list[float] = []
    to_device, start_step = trainer._to_device, trainer.train_step

    def timed_to_device(batch):
        clock = time.perf_counter()
        out = to_device(batch)
        if per_step:
            per_step[-1] += time.perf_counter() - clock
        return out

    def step_with_clock(*a, **k):
        per_step.append(0.0)
        if trainer.batches is not None and not hasattr(trainer.batches, "_timed"):
            taken = trainer.batches.next

            def timed_next(step, micro):
                clock = time.perf_counter()
                out = taken(step, micro)
                per_step[-1] += time.perf_counter() - clock
                return out

            trainer.batches.next, trainer.batches._timed = timed_next, True
        return start_step(*a, **k)

    trainer._to_device, trainer.train_step = timed_to_device, step_with_clock
    return per_step


def _caller_outside_torch() -> str:
    """file:line of the innermost frame not in torch or warnings (who asked for the value)."""
    import traceback

    for frame in reversed(traceback.extract_stack()[:-2]):
        parts = Path(frame.filename).parts
        if "torch" not in parts and "warnings.py" not in parts[-1:]:
            return f"{'/'.join(parts[-2:])}:{frame.lineno}"
    return "?"


def _step_profiler(train_step, steps: range, name: str, trace_dir: Path | None = None):
    """Wraps a step function: torch.profiler over `steps`, then the top ops by device and host time
    (or, with `trace_dir`, a Chrome trace with Python stacks and its summary)."""
    from torch.profiler import ProfilerActivity, profile

    state = {"step": 0, "prof": None}

    def step_with_profile(*args, **kwargs):
        state["step"] += 1
        if state["step"] == steps[0]:
            torch.cuda.synchronize()
            state["prof"] = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=trace_dir is not None)
            state["prof"].__enter__()
        result = train_step(*args, **kwargs)
        if state["step"] == steps[-1]:
            torch.cuda.synchronize()
            state["prof"].__exit__(None, None, None)
            if trace_dir is not None:
                _write_trace(state["prof"], trace_dir, name, len(steps))
                return result
            events = state["prof"].key_averages()
            print(f"--- profile loop:{name} ({len(steps)} steps) by device time")
            print(events.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=70))
            print(f"--- profile loop:{name} by host time")
            print(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=70))
        return result

    return step_with_profile


def trace_file_name(row: str) -> str:
    """The trace file of a row: "raw" -> raw.json.gz, "zero0:train.compile_scope=blocks" -> loop-zero0-train.compile_scope-blocks.json.gz."""
    stem = "loop-" + row.replace(":", "-").replace("=", "-").replace("+", "-").replace("/", "-") if row != "raw" else "raw"
    return f"{stem}.json.gz"


def _write_trace(prof, trace_dir: Path, name: str, steps: int) -> None:
    from bench.trace_summary import summarise
    from lmforge import ownership

    ownership.claim(trace_dir, "bench-trace", "bench.train_throughput")  # judged by main before any row ran
    path = trace_dir / trace_file_name(name)
    prof.export_chrome_trace(str(path))  # torch gzips a .gz path
    print(summarise(path, steps), flush=True)


def _sync_finder(train_step, steps: range, name: str):
    """Wraps Trainer.train_step: CUDA's sync debug mode on for `steps`, warnings counted by place."""
    import collections
    import warnings

    found: collections.Counter = collections.Counter()

    state = {"step": 0}

    def step_with_probe(*args, **kwargs):
        state["step"] += 1
        if state["step"] not in steps:
            return train_step(*args, **kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = lambda message, *rest: found.update([_caller_outside_torch()]) \
                if "synchroniz" in str(message) else None
            torch.cuda.set_sync_debug_mode("warn")
            try:
                return train_step(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                if state["step"] == steps[-1]:
                    print(f"--- host syncs of loop:{name} in {len(steps)} steps: {dict(found) or 'none'}", flush=True)

    return step_with_probe


def measure(variant: str, config: ModelConfig, args, device, compile_model: bool) -> Result:
    name, _, opts = variant.partition(":")
    options = set(filter(None, opts.split("+")))
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if name in ("raw", "loop"):
        note = ""
        if name == "raw":
            seconds = measure_raw(config, args, device, compile_model)
        else:
            seconds, input_seconds, (step, loss), wait = measure_loop(config, opts, args, device, compile_model)
            note = (f"input {input_seconds * 1e3:.2f} ms/step ({input_seconds / seconds:.2%}); host waits for the GPU "
                    f"{wait * 1e3:.1f} ms/step; loss {loss:.6f} at step {step}")
        tokens_per_second = args.batch * args.seq_len / seconds
        peak = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else 0.0
        gc.collect()
        return Result(variant, tokens_per_second, tokens_per_second * flops_per_token(config, args.seq_len) / H100_PEAK_BF16,
                      seconds * 1000, peak, note=note)
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


def print_table(results: list[Result], header: str, reference: str = "baseline") -> None:
    print(header)
    print(f"{'variant':<22} {'tok/s':>10} {'MFU':>6} {'step ms':>8} {'peak GB':>8} {'× ' + reference:>10}  note")
    for r in results:
        ratio = f"{r.ratio_to_baseline:.3f}" if r.ratio_to_baseline is not None else "-"
        print(f"{r.variant:<22} {r.tokens_per_second:>10.0f} {r.mfu:>6.1%} {r.step_ms:>8.1f} {r.peak_memory_gb:>8.2f} {ratio:>10}  {r.note}")


def deepcompile_last(variants: list[str]) -> list[str]:
    """The variants in the order given, except that loop rows whose DeepSpeed JSON turns on DeepCompile
    run after all others: DeepCompile patches torch's compiled-function backward and parameter hooks for the
    rest of the process, and a later ZeRO-3 row without it then fails (measured on an H200, DeepSpeed 0.19.8)."""
    def uses_deepcompile(variant: str) -> bool:
        kind, _, rest = variant.partition(":")
        path = resolve_repo_path(Path("ds_configs") / f"{rest.partition(':')[0]}.json")
        if kind != "loop" or not path.is_file():
            return False
        try:
            return bool(json.loads(path.read_text()).get("compile", {}).get("deepcompile"))
        except (ValueError, AttributeError):
            return False
    return sorted(variants, key=uses_deepcompile)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        args.preset, args.batch, args.seq_len, args.steps, args.warmup = "tiny", 2, 32, 2, 1
    variants = args.variants.split(",")
    if uses_data(variants) and not (args.data / "manifest.json").is_file():
        raise SystemExit(f"error: --data {args.data}: no manifest.json (make shards with `lmforge prep shards`)")
    if args.trace is not None:  # new, empty or an earlier --trace's folder: nothing of the user's is overwritten
        from lmforge import ownership
        from lmforge.errors import LmforgeError

        try:
            ownership.check_output(args.trace, "bench-trace", "bench.train_throughput", "--trace")
        except LmforgeError as err:
            raise SystemExit(f"error: {err}") from None
    info = init_distributed()
    device = info.device
    compile_model = device.type == "cuda" and not args.dry_run
    config = model_config(args.preset, args.seq_len, args.data if uses_data(variants) else None)
    results: list[Result] = []
    for variant in deepcompile_last(variants):
        try:
            results.append(measure(variant, config, args, device, compile_model))
        except torch.cuda.OutOfMemoryError:
            results.append(Result(variant, 0.0, 0.0, 0.0, 0.0, note="out of memory"))
            gc.collect()
            torch.cuda.empty_cache()
        except Exception as err:  # one variant that cannot run (e.g. a torch.compile mode) keeps the others' table
            traceback.print_exc()
            results.append(Result(variant, 0.0, 0.0, 0.0, 0.0, note=f"failed: {type(err).__name__}: {str(err)[:80]}"))
        print(f"measured {variant}: {results[-1].tokens_per_second:.0f} tok/s {results[-1].note}", flush=True)
    reference = "raw" if any(r.variant == "raw" for r in results) else "baseline"
    base = next((r.tokens_per_second for r in results if r.variant == reference and r.tokens_per_second), None)
    for r in results:
        r.ratio_to_baseline = r.tokens_per_second / base if base else None
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    with torch.device("meta"):
        params = Transformer(config).num_params()
    header = (f"{args.preset}: batch {args.batch} × seq {args.seq_len}, {gpu}, torch {torch.__version__}, "
              f"{params / 1e6:.1f}M params")
    print_table(results, header, reference)
    if args.json:
        args.json.write_text(json.dumps({"header": header, "results": [asdict(r) for r in results]}, indent=2))
    from lmforge.distributed import shutdown

    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
