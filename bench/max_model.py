"""The largest Llama one machine trains: parameters, throughput, MFU, GPU and host peaks, checkpoint save time.

    python -m bench.max_model --rows llama-7b:zero2_bf16:train.micro_batch_size=1+train.seq_len=2048 \\
        llama-13b:zero3_offload:zero_optimization.offload_optimizer.ratio=0.5 --save

A row is `preset:dsjson[:key=value+key=value]`: a preset of configs/ (or `llama-13b`, Llama-2-13B's shape,
defined here), a JSON of ds_configs/, and settings: `train.*` / `model.*` override the YAML (as --set does),
`save.writer=` picks the checkpoint writer of --save, any other dotted key sets the DeepSpeed JSON
(e.g. `zero_optimization.offload_optimizer.ratio=0.5`). The model is built by pretrain.engine.build_model
(under deepspeed.zero.Init for ZeRO-3: no full fp32 copy on the host). Each row trains --steps steps of
random tokens after one warm-up step and prints one table line; --json writes them all, with each row's
resolved configs: `python -m launch.memory_compare ROWS.json` prints launch.memory_estimate's GPU/host peaks
next to the measured ones. Runs on the CPU too (a tiny preset proves the table, tests/bench/test_max_model.py).

--save saves twice through pretrain.checkpoint.save (what training runs: DeepSpeed's files, the RNG files, sha256
of every file, COMPLETE) and reports of the second `blocked s` (the save call: how long training stops), `write s`
(until COMPLETE is on disk), `steps` (of the --steps steps trained after the save, those that ended while the
write was in flight), `wait s` (how long the end of those steps waited for the write: training stops again there
if the next save comes sooner than the write ends) and the checkpoint's bytes; `1st blk s` is the first save's
blocked time (it also allocates the background writer's host buffers). Writers (`save.writer=`):
- `blocking` (the default): DeepSpeed's torch.save engine, then the sha256 of every file, before training goes on;
- `background`: pretrain/background_checkpoint.py: a host copy, then a thread writes, hashes and fsyncs;
- `python` / `fast`: DeepSpeed's own writers (runtime/model_checkpointing/writer_factory.py; `fast` loads the aio
  op: libaio, JIT-built), with `save.decoupled=true` its writer process, and `save.<key>` any other key of
  DeepSpeed's `checkpoint.writer` (at ZeRO-1/2 DeepSpeed 0.19.8 needs `save.data_parallel=replica`: unset, it
  raises AttributeError 'UniversalParallelInfo' has no 'dp_rank'). Its writer engine reads CROSS_SIZE/CROSS_RANK,
  which only DeepSpeed's launcher sets: such a row defaults them to one host.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch

from lmforge.distributed import init_distributed, shutdown
from pretrain.config import load_pretrain_config, resolve_repo_path
from pretrain.ds_config import build_deepspeed_config
from pretrain.model import flops_per_token

H200_PEAK_BF16 = 989.4e12
"""Dense bf16 tensor-core peak of one H200 (and H100 SXM), FLOP/s."""
LLAMA_13B = ["model.arch=llama", "model.n_layers=40", "model.n_heads=40", "model.d_model=5120", "model.d_ff=13824",
             "model.max_seq_len=4096", "model.n_kv_heads=null"]
VOCAB = 32000
LMFORGE_WRITERS = ("blocking", "background")
"""train.checkpoint_writer values; any other save.writer is one of DeepSpeed's (`python`, `fast`)."""


def parse_row(row: str) -> tuple[str, str, dict[str, str]]:
    """`preset:dsjson[:k=v+k=v]` -> (preset, json name, settings)."""
    parts = row.split(":", 2)
    if len(parts) < 2:
        raise SystemExit(f"--rows {row!r}: expected preset:dsjson[:key=value+key=value]")
    settings = dict(item.split("=", 1) for item in parts[2].split("+") if item) if len(parts) == 3 else {}
    return parts[0], parts[1], settings


SAVE_VERB = "bench.max_model"


def save_folder(save_dir: Path, row: str) -> Path:
    """--save's folder of one row: SAVE_DIR/preset-json-writer."""
    preset, json_name, settings = parse_row(row)
    return save_dir / f"{preset}-{json_name}-{settings.get('save.writer', 'blocking')}"


def judge_save_folders(save_dir: Path, rows: list[str]) -> None:
    """Before any row runs: each row's --save folder is new, empty or one this bench made (its checkpoints
    are replaced); anything else (a training run, a user's files) is refused in one line, left as it was."""
    from lmforge import ownership
    from lmforge.errors import LmforgeError

    for row in rows:
        folder = save_folder(save_dir, row)
        try:
            if ownership.check_output(folder, "run", SAVE_VERB, "--save-dir") and \
                    (ownership.read_owner(folder) or {}).get("verb") != SAVE_VERB:
                raise LmforgeError(f"--save-dir {folder}: is a pretraining run that bench.max_model did not make; nothing "
                                   "was changed: choose another --save-dir")
        except LmforgeError as err:
            raise SystemExit(f"error: {err}") from None


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def row_configs(preset: str, json_name: str, settings: dict[str, str], world: int, bf16: bool):
    """(PretrainConfig, merged DeepSpeed JSON, save settings) of one row."""
    overrides = [f"{k}={v}" for k, v in settings.items() if k.startswith(("train.", "model."))]
    base = "llama-7b" if preset == "llama-13b" else preset
    config = load_pretrain_config(base, (LLAMA_13B if preset == "llama-13b" else []) + [f"model.vocab_size={VOCAB}"] + overrides)
    ds_config = build_deepspeed_config(resolve_repo_path(Path("ds_configs") / f"{json_name}.json"), config.train, world, bf16)
    save = {k.split(".", 1)[1]: _value(v) for k, v in settings.items() if k.startswith("save.")}
    for key, text in settings.items():
        if key.startswith(("train.", "model.", "save.")):
            continue
        *path, last = key.split(".")
        section = ds_config
        for part in path:
            section = section.setdefault(part, {})
        section[last] = _value(text)
    save.setdefault("writer", "blocking")
    if save["writer"] not in LMFORGE_WRITERS:  # DeepSpeed's writer engine reads the variables its own launcher sets
        for name, default in (("CROSS_SIZE", "1"), ("CROSS_RANK", os.environ.get("GROUP_RANK", "0")), ("LOCAL_RANK", "0")):
            os.environ.setdefault(name, default)
        ds_config["checkpoint"] = {"writer": {"type": save["writer"], "decoupled": bool(save.get("decoupled", False)),
                                              **{k: v for k, v in save.items() if k not in ("writer", "decoupled")}}}
    return config, ds_config, save


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def run_row(row: str, args, info) -> dict:
    from pretrain.engine import build_engine, build_model, optimizer_step

    preset, json_name, settings = parse_row(row)
    cuda = info.device.type == "cuda"
    config, ds_config, save = row_configs(preset, json_name, settings, info.world_size, cuda)
    train = config.train
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    # train.optimizer=adamw8bit (bf16 weights) is built on the GPU, as pretrain.train.Trainer builds it
    with torch.device(info.device) if train.optimizer == "adamw8bit" and cuda else nullcontext():
        model = build_model(config.model, ds_config)
    params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    engine = build_engine(model, ds_config, train.weight_decay, compile_model=False, optimizer=train.optimizer)
    tokens = torch.randint(0, VOCAB, (train.micro_batch_size, train.seq_len + 1), device=info.device)
    batches = [(tokens[:, :-1], tokens[:, 1:])] * train.grad_accum_steps
    optimizer_step(engine, batches)  # warm-up: CPU-Adam's first step, buffers
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(args.steps):
        loss = optimizer_step(engine, batches)
    final = float(loss)
    seconds = (time.perf_counter() - started) / args.steps
    step_tokens = train.micro_batch_size * train.grad_accum_steps * info.world_size * train.seq_len
    per_second = step_tokens / seconds
    host_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {"row": row, "params": params, "tokens_per_step": step_tokens, "tokens_per_second": per_second,
              "mfu": per_second / info.world_size * flops_per_token(config.model, train.seq_len) / H200_PEAK_BF16 if cuda else None,
              "gpu_peak_bytes": torch.cuda.max_memory_allocated() if cuda else None, "host_peak_bytes": host_peak,
              "host_bytes_per_param": host_peak / params, "loss": final,
              # what launch.memory_compare needs to put the estimate next to the measurement (bench may not import launch/)
              "config": {"model": asdict(config.model), "train": asdict(train), "ds_config": ds_config,
                         "world": info.world_size, "device": info.device.type}}
    if args.save:
        result.update(timed_save(engine, save_folder(args.save_dir, row), save["writer"], batches, args.steps, args.saves))
        result["writer"] = json.dumps(ds_config.get("checkpoint", {}).get("writer", save["writer"]))
    del engine, model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def timed_save(engine, run_dir: Path, writer: str, batches, max_steps: int, saves: int = 2) -> dict:
    """Saves `saves` times as training does (pretrain.checkpoint.save), each followed by `max_steps` steps and
    the wait for the write.

    The last save is the one reported: the first also allocates (and on a GPU pins) the background
    writer's host buffers, which later saves reuse; its blocked time is `first_save_seconds`. One save
    (`--saves 1`) where the disk holds one checkpoint but not two (keep_last=1 deletes the older one
    only once the newer is complete).
    """
    from lmforge import ownership
    from pretrain import checkpoint
    from pretrain.engine import optimizer_step

    # the folder was judged by judge_save_folders before any row ran: new, empty or this bench's own
    shutil.rmtree(checkpoint.checkpoints_dir(run_dir), ignore_errors=True)
    ownership.claim(run_dir, "run", SAVE_VERB)
    first = 0.0
    for step in range(1, saves + 1):
        started = time.perf_counter()
        tag = checkpoint.save(engine, run_dir, step, {"step": step}, keep_last=1,
                              writer="background" if writer == "background" else "blocking")
        blocked = time.perf_counter() - started
        first = blocked if step == 1 else first
        write = getattr(engine.checkpoint_engine, "in_flight", None)
        steps = 0
        for _ in range(max_steps):  # always max_steps: whether a write is done differs between ranks
            optimizer_step(engine, batches)
            steps += write is not None and not write.done()
        waiting = time.perf_counter()
        checkpoint.finish_pending_save(engine)
        waited = time.perf_counter() - waiting if write is not None else 0.0
        written = blocked + (write.write_seconds or 0.0 if write is not None else 0.0)
    folder = checkpoint.checkpoints_dir(run_dir) / tag
    return {"first_save_seconds": first, "save_seconds": blocked, "write_seconds": written, "steps_during_write": steps,
            "wait_seconds": waited, "checkpoint_bytes": folder_bytes(folder),
            "host_peak_after_save_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "checkpoint_files": {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}}


def _gib(n) -> str:
    return "-" if n is None else f"{n / 2**30:.1f}"


def print_table(rows: list[dict], device: str) -> None:
    print(f"max_model on {device}: MFU over {H200_PEAK_BF16 / 1e12:.1f} TFLOP/s dense bf16; peaks in GiB")
    print(f"{'row':<48} {'params':>8} {'tok/step':>9} {'tok/s':>9} {'MFU':>6} {'GPU pk':>7} {'host pk':>8} {'B/param':>8} {'1st blk s':>9} {'blocked s':>9} {'write s':>7} {'steps':>5} {'wait s':>6} {'ckpt GiB':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['row']:<48} failed: {r['error']}")
            continue
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        saved = "save_seconds" in r
        save = (f"{r['first_save_seconds']:>9.2f} {r['save_seconds']:>9.2f} {r['write_seconds']:>7.2f} {r['steps_during_write']:>5} "
                f"{r['wait_seconds']:>6.2f}" if saved else f"{'-':>9} {'-':>9} {'-':>7} {'-':>5} {'-':>6}")
        print(f"{r['row']:<48} {r['params'] / 1e9:>7.3f}B {r['tokens_per_step']:>9,} {r['tokens_per_second']:>9,.0f} {mfu:>6} "
              f"{_gib(r['gpu_peak_bytes']):>7} {_gib(r['host_peak_bytes']):>8} {r['host_bytes_per_param']:>8.1f} {save} "
              f"{_gib(r.get('checkpoint_bytes')):>8}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=["llama-7b:zero2_bf16", "llama-13b:zero3_offload"])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--save", action="store_true", help="time a checkpoint save after the steps: blocked, written, its size (save.writer= picks the writer)")
    parser.add_argument("--save-dir", type=Path, default=Path("runs/bench_max_model"))
    parser.add_argument("--saves", type=int, default=2, choices=(1, 2), help="saves per row with --save; the last is reported")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.save:
        judge_save_folders(args.save_dir, args.rows)
    info = init_distributed()
    rows = []
    for row in args.rows:
        try:
            rows.append(run_row(row, args, info))
        except (torch.cuda.OutOfMemoryError, MemoryError) as err:  # too big is a result here, not a bug
            rows.append({"row": row, "error": f"{type(err).__name__}: {str(err)[:120]}"})
            gc.collect()
        print(json.dumps(rows[-1]), flush=True)
    if info.rank == 0:
        print_table(rows, torch.cuda.get_device_name() if info.device.type == "cuda" else "cpu")
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
