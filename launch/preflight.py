"""`lmforge preflight --config X`: check a launch before any GPU work; every problem, one line each.

Checks the YAML and its DeepSpeed JSON together (the batch arithmetic for the world size, ZeRO and
offload options, bf16 on this GPU), the hostfile and the world size it gives, the data (manifest
checksums, one tokenizer, its vocabulary against model.vocab_size), that run.dir is writable and
has room for the checkpoints, and TORCH_CUDA_ARCH_LIST. Then the same `pretrain.train.prepare`
that training runs. Problems go to stderr as `error: ...` lines and exit 2; otherwise an `ok`
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
from launch.zero_checks import precision_problems, zero_problems
from lmforge.errors import USER_ERROR_EXIT_CODE, LmforgeError, run_cli
from lmforge.run_layout import DEEPSPEED_ENV_FILE
from pretrain.checkpoint_space import BYTES_PER_PARAM, checkpoint_space, human_bytes


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
    parser.add_argument("--skip-checksums", action="store_true", help="do not re-hash the shards (sizes are still checked by training)")
    parser.add_argument("--print-exports", action="store_true",
                        help="stdout: only `export NAME=VALUE` lines for a shell to eval; the summary goes to stderr")
    parser.add_argument("--deepspeed-env", action="store_true",
                        help="write RUN_DIR/.deepspeed_env, DeepSpeed's KEY=VALUE file of variables for every node "
                             "(with --print-exports, also `export DS_ENV_FILE=` naming it)")
    parser.add_argument("--export", action="append", default=[], metavar="NAME",
                        help=f"also forward this variable in --deepspeed-env (always: {', '.join(environment.FORWARDED)})")
    return parser.parse_args(argv)


SUMMARY_ORDER = ["world size", "global batch", "tokens/step", "model", "checkpoints", "deepspeed", "data",
                 environment.ARCH_LIST, "deepspeed env"]


@dataclass
class Findings:
    problems: list[str] = field(default_factory=list)
    run_dir: Path | None = None
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
        return size
    hostfile, problems = read_hostfile(args.hostfile)
    found.problems += problems
    if hostfile is None:
        return None
    try:
        chosen = select_slots(hostfile, args.include, args.exclude, args.num_nodes, args.num_gpus)
    except LmforgeError as err:
        found.problems.append(str(err))
        return None
    size = sum(len(slots) for slots in chosen.values())
    if args.world_size is not None and args.world_size != size:
        found.problems.append(
            f"--world-size {args.world_size} but {args.hostfile} (with the launch's filters) gives {size} slots "
            f"({', '.join(f'{h}:{len(s)}' for h, s in chosen.items())}); make them agree"
        )
        return None
    found.fact("world size", f"{size} rank(s) on {len(chosen)} host(s) of {args.hostfile}: {', '.join(chosen)}")
    return size


def data_vocab(config, verify: bool, found: Findings) -> int | None:
    """Checks every shard directory (checksums, one tokenizer, vocab); returns the tokenizer's vocab size."""
    from data_prep.manifest import load_manifest, verify_manifest
    from data_prep.tokenizer import Tokenizer
    from pretrain.config import resolve_repo_path

    manifests = []
    for path in config.data.path:
        try:
            manifests.append((verify_manifest if verify else load_manifest)(resolve_repo_path(path)))
        except LmforgeError as err:
            found.problems.append(f"data.path: {err}")
    if len(manifests) < len(config.data.path):
        return None
    if len({m.tokenizer.fingerprint for m in manifests}) > 1:
        listing = ", ".join(f"{m.directory} ({m.tokenizer.fingerprint[:12]})" for m in manifests)
        found.problems.append(f"data.path: shard sets were made with different tokenizers: {listing}")
        return None
    vocab = manifests[0].tokenizer.vocab_size
    try:
        file_vocab = Tokenizer.load(manifests[0].tokenizer_copy).vocab_size
    except Exception as err:  # sentencepiece raises plain RuntimeError/OSError for a bad file
        found.problems.append(f"{manifests[0].tokenizer_copy}: unreadable tokenizer ({err}); regenerate with `lmforge prep shards`")
        return None
    if file_vocab != vocab:
        found.problems.append(f"{manifests[0].tokenizer_copy}: {file_vocab} tokens but its manifest says {vocab}; regenerate with `lmforge prep shards`")
        return None
    if config.model.vocab_size is not None and config.model.vocab_size != vocab:
        found.problems.append(
            f"model.vocab_size = {config.model.vocab_size} but the tokenizer of data.path has {vocab} tokens; "
            "set model.vocab_size to null to take the tokenizer's"
        )
        return None
    tokens = sum(m.tokens("train") for m in manifests)
    found.fact("data", f"{len(manifests)} shard dir(s), {tokens:,} train tokens, vocab {vocab}"
               f"{', checksums verified' if verify else ', checksums skipped'}")
    return vocab


def deepspeed_config(config, world: int | None, found: Findings) -> dict[str, Any] | None:
    """DeepSpeed's merged JSON for `world` ranks (None when unknown: the raw JSON is checked alone)."""
    import torch

    from lmforge.distributed import bf16_supported
    from pretrain.config import resolve_repo_path
    from pretrain.ds_config import build_deepspeed_config, read_deepspeed_json
    from pretrain.pipeline import data_parallel_size

    path = resolve_repo_path(config.deepspeed.config)
    try:
        raw = read_deepspeed_json(path)
    except LmforgeError as err:
        found.problems.append(str(err))
        return None
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    found.problems += precision_problems(raw, path, gpu, bf16_supported())
    found.problems += zero_problems(raw, path)
    if world is None:
        return None
    try:
        return build_deepspeed_config(path, config.train, data_parallel_size(config.parallel, world), bf16_supported())
    except LmforgeError as err:
        found.problems.append(str(err))
        return None


def run_dir_ok(run_dir: Path, found: Findings) -> bool:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".preflight_probe{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
        return True
    except OSError as err:
        found.problems.append(f"run.dir = {run_dir}: not writable ({err.strerror})")
        return False


def model_params(model_config) -> int:
    """Parameters of the model: built on the CPU when small, else on the meta device (no memory, any size).

    (The meta device costs a second or two of torch._dynamo imports; a small model builds in milliseconds.)
    """
    import contextlib

    import torch

    from pretrain.model import Transformer, matmul_params

    small = matmul_params(model_config) < 20_000_000
    with contextlib.nullcontext() if small else torch.device("meta"):
        return Transformer(model_config).num_params()


def disk_fits(config, params: int, found: Findings) -> None:
    space = checkpoint_space(config.run.dir, params, config.train.keep_last)
    keep = config.train.keep_last
    sizes = (f"~{human_bytes(space.bytes_each)} each ({params:,} params × {BYTES_PER_PARAM} bytes), up to {keep + 1} "
             f"on disk (train.keep_last = {keep}, + 1 being written)")
    if space.bytes_needed > space.bytes_free:
        found.problems.append(f"run.dir = {config.run.dir}: {human_bytes(space.bytes_free)} free, but checkpoints need "
                              f"{human_bytes(space.bytes_needed)}: {sizes}; free space, lower train.keep_last or move run.dir")
    found.fact("checkpoints", f"{sizes}; {human_bytes(space.bytes_free)} free at {config.run.dir}")


def check(args: argparse.Namespace) -> Findings:
    """Runs every check; problems and summary facts, in that order of interest."""
    from pretrain.config import load_pretrain_config

    found = Findings()
    before, after, problems = environment.normalised_arch_list()
    found.problems += problems
    if before and not problems:
        found.fact(environment.ARCH_LIST, after if before == after else f"{before!r} -> {after!r} (what DeepSpeed's JIT parses)")
    world = world_size(args, found)
    try:
        config = load_pretrain_config(args.config, args.set)
    except LmforgeError as err:
        found.problems.append(str(err))
        return found
    vocab = data_vocab(config, not args.skip_checksums, found)
    ds_config = deepspeed_config(config, world, found)
    writable = run_dir_ok(config.run.dir, found)
    found.run_dir = config.run.dir
    if vocab is not None:
        params = model_params(config.model.with_vocab(vocab))
        found.fact("model", f"{config.model.arch}, {params / 1e6:,.2f}M params, vocab {vocab}")
        if writable:
            disk_fits(config, params, found)
    if ds_config is not None and world is not None:
        summarise_batch(config, ds_config, world, found)
    if not found.problems:
        from pretrain.train import prepare

        prepare(config, world)  # what training itself checks, to be sure the two agree
    return found


def summarise_batch(config, ds_config: dict[str, Any], world: int, found: Findings) -> None:
    from pretrain.ds_config import precision_of, zero_stage_of

    train = config.train
    batch = ds_config["train_batch_size"]
    stages = config.parallel.pipeline_stages
    ranks = f"{world} ranks" if stages == 1 else f"{world // stages} data-parallel ranks ({world} ranks / {stages} pipeline stages)"
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
