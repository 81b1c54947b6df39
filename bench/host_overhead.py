"""Per-step host (Python) time of lmforge's engine at ZeRO-0/1/2 on one data-parallel rank, on the CPU.

    python -m bench.host_overhead --stages 0,1,2 --steps 50 [--profile]

A model with GPT-2 124M's tensor count (12 gpt2 blocks with biases: 196 parameter tensors) but tiny
widths (d_model 64, vocab 512, seq 32, batch 1), so the arithmetic is ~0 and what is left per
step is the host work that does not shrink with the model: DeepSpeed's per-parameter gradient
hooks, bucketing, norms and optimizer bookkeeping, and lmforge's step guard. On a GPU that host
work is what makes ZeRO-1/2 slower than ZeRO-0 at one rank (docs/performance.md), so this CPU run
is a proxy for it; the GPU measurement is bench/train_throughput.py's.

Each stage builds lmforge's real engine as pretrain/train.py does: ds_configs/zeroN.json merged by
pretrain.ds_config.build_deepspeed_config, with the settings a 1-rank run adds
(pretrain.ds_config.for_one_zero_rank; `--as-shipped` leaves them out, the step guard's one-rank
gradient norm stays), pretrain.engine.build_model / build_engine, stepped through
pretrain.guarded_step.GuardedStep: --warmup untimed steps, then --steps timed ones, the stages
taking turns step by step (time.perf_counter around each step and its settle). Prints one table:
the median and the fastest ms/step, each with its ratio to ZeRO-0 (the first stage listed when 0
is not); on a shared machine the fastest step is the steadier number. --profile adds cProfile's
top functions of each stage's timed steps. Plain `python` is one rank: DeepSpeed creates a 1-rank
gloo group; one torch thread (--threads); CPU only.
`--dry-run` runs 2 steps per stage (CI runs it so the script cannot rot).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from pretrain.config import TrainConfig, resolve_repo_path
from pretrain.ds_config import build_deepspeed_config, for_one_zero_rank, guards_on_device
from pretrain.model import ModelConfig

TENSOR_COUNT_MODEL = ModelConfig(arch="gpt2", vocab_size=512, pad_vocab_to_multiple=128, n_layers=12, n_heads=4,
                                 d_model=64, max_seq_len=32, bias=True)


@dataclass(frozen=True)
class StageTiming:
    stage: int
    """N of ds_configs/zeroN.json (with the one-rank settings, ZeRO-2 runs as ZeRO-1)."""
    ms_per_step: float
    """Median wall time of one optimizer step (host time: the arithmetic is ~0)."""
    fastest_ms: float
    """The fastest step (the least disturbed by other processes on the machine)."""
    parameter_tensors: int
    """Trainable tensors the engine steps (lmforge's gpt2-124m has 196)."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default="0,1,2", help="comma-separated ZeRO stages (ds_configs/zeroN.json)")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per stage")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--profile", action="store_true", help="also print cProfile's top functions per stage")
    parser.add_argument("--top", type=int, default=25, help="functions listed by --profile")
    parser.add_argument("--as-shipped", action="store_true",
                        help="the JSONs as shipped, without pretrain.ds_config.for_one_zero_rank's one-rank settings "
                             "(the step guard's one-rank gradient norm stays: it is code, not a setting)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--dry-run", action="store_true", help="2 timed steps, 1 warm-up per stage")
    return parser.parse_args(argv)


def stage_ds_config(stage: int, train: TrainConfig, one_rank_settings: bool = True) -> dict:
    """ds_configs/zeroN.json merged as a 1-rank CPU run merges it (fp32: no bf16 on the CPU), with
    pretrain.ds_config.for_one_zero_rank's settings unless `one_rank_settings` is False."""
    path = resolve_repo_path(Path(f"ds_configs/zero{stage}.json"))
    ds_config = build_deepspeed_config(path, train, 1, bf16_supported=False)
    return for_one_zero_rank(ds_config, 1)[0] if one_rank_settings else ds_config


def build_stepper(stage: int, train: TrainConfig, one_rank_settings: bool = True):
    """(GuardedStep over lmforge's engine for `stage`, the engine), built as pretrain.train.Trainer builds them."""
    from pretrain.engine import build_engine, build_model
    from pretrain.guarded_step import GuardedStep

    ds_config = stage_ds_config(stage, train, one_rank_settings)
    torch.manual_seed(train.seed)
    model = build_model(TENSOR_COUNT_MODEL, ds_config)
    on_device = guards_on_device(ds_config)
    engine = build_engine(model, ds_config, train.weight_decay, compile_model=False, guard_clips=on_device)
    guarded = GuardedStep(engine, train.max_bad_steps, fp16=False, on_device=on_device, grad_clip=train.grad_clip)
    return guarded, engine


def time_stages(stages: list[int], train: TrainConfig, steps: int, warmup: int, one_rank_settings: bool = True,
                profile: bool = False) -> tuple[list[StageTiming], dict[int, cProfile.Profile]]:
    """The timing of `steps` guarded steps per stage after `warmup`, and with `profile` a cProfile of
    each stage's timed steps. The stages take turns step by step, so a busy machine slows them alike."""
    steppers = {stage: build_stepper(stage, train, one_rank_settings) for stage in stages}
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, TENSOR_COUNT_MODEL.vocab_size, (steps + warmup, train.micro_batch_size, train.seq_len + 1),
                           generator=generator)
    batches = [(t[:, :-1], t[:, 1:]) for t in tokens]
    times: dict[int, list[float]] = {stage: [] for stage in stages}
    profilers = {stage: cProfile.Profile() for stage in stages} if profile else {}
    for step in range(warmup + steps):
        for stage, (guarded, _) in steppers.items():
            timed = step >= warmup
            if timed and profile:
                profilers[stage].enable()
            start = time.perf_counter()
            guarded.step([batches[step]], step + 1, False)
            guarded.settle()  # on the CPU the step is done already: this reads its flags
            if timed:
                times[stage].append(time.perf_counter() - start)
            if timed and profile:
                profilers[stage].disable()
    timings = []
    for stage, (_, engine) in steppers.items():
        tensors = sum(1 for p in engine.module.parameters() if p.requires_grad)
        timings.append(StageTiming(stage, 1000 * statistics.median(times[stage]), 1000 * min(times[stage]), tensors))
    return timings, profilers


def print_table(timings: list[StageTiming], header: str) -> None:
    reference = next((t for t in timings if t.stage == 0), timings[0])
    print(header)
    ratio = f"× ZeRO-{reference.stage}"
    print(f"{'stage':>5} {'ms/step':>9} {ratio:>9} {'fastest':>9} {ratio:>9} {'tensors':>8}")
    for t in timings:
        print(f"{t.stage:>5} {t.ms_per_step:>9.2f} {t.ms_per_step / reference.ms_per_step:>9.2f} {t.fastest_ms:>9.2f} "
              f"{t.fastest_ms / reference.fastest_ms:>9.2f} {t.parameter_tensors:>8}")


def print_profile(stage: int, profiler: cProfile.Profile, top: int) -> None:
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text).sort_stats("tottime")
    stats.print_stats(top)
    print(f"--- ZeRO-{stage}: cProfile, top {top} by own time over the timed steps")
    print(text.getvalue().strip())


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        args.steps, args.warmup = 2, 1
    stages = [int(s) for s in args.stages.split(",")]
    if torch.cuda.is_available():
        raise SystemExit("error: bench.host_overhead measures on the CPU; run it with CUDA_VISIBLE_DEVICES= "
                         "(the GPU's numbers: bench/train_throughput.py's loop:zeroN rows)")
    from lmforge.distributed import init_distributed, shutdown

    init_distributed()
    torch.set_num_threads(args.threads)  # tiny ops: more threads only add contention
    train = replace(TrainConfig(), micro_batch_size=1, seq_len=TENSOR_COUNT_MODEL.max_seq_len, grad_accum_steps=1,
                    max_steps=10_000, warmup_steps=10)
    timings, profilers = time_stages(stages, train, args.steps, args.warmup, not args.as_shipped, args.profile)
    for stage, profiler in profilers.items():
        print_profile(stage, profiler, args.top)
    settings = "JSONs as shipped" if args.as_shipped else "one-rank settings"
    header = (f"host time per step, cpu, 1 rank, {timings[0].parameter_tensors} tensors (gpt2 12 layers, d_model "
              f"{TENSOR_COUNT_MODEL.d_model}, vocab {TENSOR_COUNT_MODEL.vocab_size}, batch 1 × seq {train.seq_len}), "
              f"{settings}, {args.steps} steps after {args.warmup}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads")
    print_table(timings, header)
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
