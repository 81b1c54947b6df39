"""`lmforge preflight --config X`: check a launch before any GPU work; every problem, one line each.

Runs `pretrain.run_checks.check_launch`, the same checks `lmforge train` makes (the YAML and its
DeepSpeed JSON: keys, types, ranges, the batch arithmetic for the world size, ZeRO and offload
options, bf16 on this GPU; the data: manifest checksums, one tokenizer, its vocabulary; that
run.dir can be made and has room for the checkpoints), and adds what needs no training process:
the hostfile and the world size it gives, TORCH_CUDA_ARCH_LIST, and the memory estimate
(launch.memory_estimate): a run whose host peak exceeds the host's memory (or, with a GPU visible
or --gpu-memory-gib, whose GPU peak exceeds the GPU's) is refused in one line. Nothing is created unless every
check passed (then only RUN_DIR/.deepspeed_env, with --deepspeed-env). Problems go to stderr as `error: ...` lines and exit 2; otherwise an `ok`
summary (world size, global batch, tokens/step, parameters, checkpoint size). Every launch
script runs it first; `--print-exports` prints the `export` lines for them to eval.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from launch import environment
from launch.hostfile import read_hostfile, select_slots
from lmforge.errors import USER_ERROR_EXIT_CODE, LmforgeError, run_cli
from lmforge.run_layout import DEEPSPEED_ENV_FILE
from pretrain.checkpoint_space import BYTES_PER_PARAM


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise LmforgeError(f"{self.prog}: {message}; see {self.prog} --help")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = _Parser(prog="lmforge preflight", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny", help="preset name in configs/ or a YAML path (default: tiny)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    parser.add_argument("--world-size", type=int, default=None, metavar="N",
                        help="ranks the launch starts (default: the hostfile's slots, else WORLD_SIZE/SLURM_NTASKS, else 1)")
    hosts = parser.add_argument_group("hosts, with DeepSpeed's meanings")
    hosts.add_argument("--hostfile", "-H", type=Path, default=None, help="'HOST slots=N' lines")
    hosts.add_argument("--include", "-i", default="", metavar="NODE_SPEC", help="e.g. 'worker-0@worker-1:0,2'")
    hosts.add_argument("--exclude", "-e", default="", metavar="NODE_SPEC")
    hosts.add_argument("--num_nodes", "--num-nodes", type=int, default=-1, metavar="N", help="the first N hosts")
    hosts.add_argument("--num_gpus", "--num-gpus", type=int, default=-1, metavar="N", help="slots 0..N-1 of each host")
    memory = parser.add_argument_group("memory (the estimate of launch.memory_estimate; a run that does not fit is refused)")
    memory.add_argument("--host-memory-gib", type=float, default=None, metavar="GIB",
                        help="host memory of each machine (default: MemTotal of this machine's /proc/meminfo)")
    memory.add_argument("--gpu-memory-gib", type=float, default=None, metavar="GIB",
                        help="memory of each GPU (default: this machine's GPU; none visible and no flag: no GPU check)")
    parser.add_argument("--skip-checksums", action="store_true", help="do not re-hash the shards (sizes are still checked by training)")
    parser.add_argument("--print-exports", action="store_true",
                        help="stdout: only `export NAME=VALUE` lines for a shell to eval; the summary goes to stderr")
    parser.add_argument("--deepspeed-env", action="store_true",
                        help="write RUN_DIR/.deepspeed_env, DeepSpeed's KEY=VALUE file of variables for every node "
                             "(with --print-exports, also `export DS_ENV_FILE=` naming it)")
    parser.add_argument("--export", action="append", default=[], metavar="NAME",
                        help=f"also forward this variable in --deepspeed-env (always: {', '.join(environment.FORWARDED)})")
    return parser.parse_args(argv)


SUMMARY_ORDER = ["world size", "global batch", "tokens/step", "model", "checkpoints", "deepspeed", "memory", "data",
                 environment.ARCH_LIST, "deepspeed env", "note"]


@dataclass
class Findings:
    problems: list[str] = field(default_factory=list)
    run_dir: Path | None = None
    ranks_per_host: int | None = None
    facts: list[tuple[str, str]] = field(default_factory=list)

    def fact(self, name: str, text: str) -> None:
        self.facts.append((name, text))


def world_size(args: argparse.Namespace, found: Findings) -> int | None:
    """The launch's world size from the hostfile (with the filters) or --world-size; None when unknown."""
    from lmforge.distributed import launcher_world_size

    if args.world_size is not None and args.world_size < 1:
        found.problems.append(f"--world-size {args.world_size}: must be at least 1")
        return None
    if args.hostfile is None:
        size = args.world_size or launcher_world_size()
        found.fact("world size", f"{size} rank(s)")
        found.ranks_per_host = size
        return size
    hostfile, problems = read_hostfile(args.hostfile)
    found.problems += problems
    if hostfile is None:
        return None
    try:
        chosen = select_slots(hostfile, args.include, args.exclude, args.num_nodes, args.num_gpus)
    except LmforgeError as err:
        found.problems += str(err).splitlines()
        return None
    size = sum(len(slots) for slots in chosen.values())
    found.ranks_per_host = max((len(slots) for slots in chosen.values()), default=0)
    if args.world_size is not None and args.world_size != size:
        found.problems.append(
            f"--world-size {args.world_size} but {args.hostfile} (with the launch's filters) gives {size} slots "
            f"({', '.join(f'{h}:{len(s)}' for h, s in chosen.items())}); make them agree"
        )
        return None
    found.fact("world size", f"{size} rank(s) on {len(chosen)} host(s) of {args.hostfile}: {', '.join(chosen)}")
    return size


def launch_facts(config, launch, verify: bool, found: Findings) -> None:
    """The summary lines of what `pretrain.run_checks.check_launch` measured."""
    from pretrain.checkpoint_space import human_bytes

    if launch.vocab is not None:
        found.fact("data", f"{launch.shard_dirs} shard dir(s), {launch.train_tokens:,} train tokens, vocab {launch.vocab}"
                   f"{', checksums verified' if verify else ', checksums skipped'}")
    if launch.params is not None:
        found.fact("model", f"{config.model.arch}, {launch.params / 1e6:,.2f}M params, vocab {launch.vocab}")
    space = launch.checkpoint_space
    if space is not None:
        from pretrain.run_checks import checkpoints_at_once

        count, keep = checkpoints_at_once(config.train), config.train.keep_last
        at_once = (f"up to {count} on disk (train.keep_last = {keep}, + 1 being written)" if count > 1
                   else "1 on disk (train.save_interval = 0: saved at the end only)")
        found.fact("checkpoints", f"~{human_bytes(space.bytes_each)} each ({launch.params:,} params × {BYTES_PER_PARAM} bytes), "
                   f"{at_once}; {human_bytes(space.bytes_free)} free at {config.run.dir}")
    for note in launch.notes:
        found.fact("note", note)


def check(args: argparse.Namespace) -> Findings:
    """Runs every check; problems and summary facts, in that order of interest.

    The checks of the config, data, DeepSpeed JSON and run.dir are `pretrain.run_checks.check_launch`,
    the very function `lmforge train` runs; preflight adds only what needs no training process
    (hosts, the launcher's world size, TORCH_CUDA_ARCH_LIST). Nothing is created here."""
    from pretrain.config import load_pretrain_config
    from pretrain.run_checks import check_launch

    found = Findings()
    before, after, problems = environment.normalised_arch_list()
    found.problems += problems
    if before and not problems:
        found.fact(environment.ARCH_LIST, after if before == after else f"{before!r} -> {after!r} (what DeepSpeed's JIT parses)")
    world = world_size(args, found)
    try:
        config = load_pretrain_config(args.config, args.set)
    except LmforgeError as err:
        found.problems += str(err).splitlines()
        return found
    launch = check_launch(config, world, verify_checksums=not args.skip_checksums)
    found.problems += launch.problems
    found.run_dir = config.run.dir
    launch_facts(launch.config, launch, not args.skip_checksums, found)
    if launch.ds_config is not None and world is not None:
        summarise_batch(launch.config, launch.ds_config, world, found)
    if launch.ds_config is not None and world is not None and not found.problems:  # judged on an otherwise sound launch
        from launch.memory_check import check_memory

        check_memory(launch.config, launch.ds_config, world, found, args.host_memory_gib, args.gpu_memory_gib)
    return found


def summarise_batch(config, ds_config: dict[str, Any], world: int, found: Findings) -> None:
    from pretrain.ds_config import precision_of, zero_stage_of

    train = config.train
    batch = ds_config["train_batch_size"]
    stages, tensor = config.parallel.pipeline_stages, config.parallel.tensor
    split = " × ".join(f"{n} {what}" for n, what in ((stages, "pipeline stages"), (tensor, "tensor-parallel ranks")) if n > 1)
    ranks = f"{world} ranks" if not split else f"{world // (stages * tensor)} data-parallel ranks ({world} ranks / {split})"
    found.fact("global batch", f"{batch} sequences = micro {train.micro_batch_size} × accum {train.grad_accum_steps} × {ranks}")
    found.fact("tokens/step", f"{batch * train.seq_len:,} ({train.seq_len} tokens per sequence)")
    found.fact("deepspeed", f"{config.deepspeed.config}: ZeRO-{zero_stage_of(ds_config)}, {precision_of(ds_config)} on this machine")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    found = check(args)
    values: dict[str, str] = {}
    if args.deepspeed_env:
        values, problems = environment.deepspeed_env(os.environ, args.export)
        found.problems += problems
    if found.problems:
        for problem in found.problems:
            print(f"error: {' '.join(problem.split())}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    env_file = None
    if args.deepspeed_env:
        found.run_dir.mkdir(parents=True, exist_ok=True)  # every check passed: the run dir may exist now
        env_file = (found.run_dir / DEEPSPEED_ENV_FILE).resolve()
        environment.write_deepspeed_env(env_file, values)
        found.fact("deepspeed env", f"{env_file}: {', '.join(values) or 'nothing'}")
    summary = sys.stderr if args.print_exports else sys.stdout
    found.facts.sort(key=lambda fact: SUMMARY_ORDER.index(fact[0]))
    width = max((len(name) for name, _ in found.facts), default=0)
    print(f"ok: {args.config}", file=summary)
    for name, text in found.facts:
        print(f"  {name:<{width}}  {text}", file=summary)
    if args.print_exports:
        for line in environment.export_lines(os.environ.get(environment.ARCH_LIST), env_file):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
