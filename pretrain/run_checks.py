"""The one set of checks every launch runs before anything is created: `lmforge train` (prepare), `lmforge
preflight` and, through preflight, launch/deepspeed.sh and launch/slurm/*.

`check_launch` judges a pretraining config for a world size: the data (manifests, checksums, one
tokenizer, its vocabulary against the manifest's and model.vocab_size, shards readable as training
reads them), DeepSpeed's JSON (`pretrain.ds_json_checks`: keys, types, ranges, offload; then the
merge with our YAML for the world size), the parallel degrees against the world and the model
(`parallel.degrees.degree_problems`), whether run.dir can be made and written (without making
it) and whether its disk has room for the checkpoints that will be on it at once. It collects
every problem (one line each) and never writes anything; `raise_problems` turns them into one
LmforgeError whose lines `run_cli` prints as `error: ...` each. Only the caller, once no problem
is left, creates run.dir (`check_run_dir`).
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import LmforgeError
from pretrain.config import DataConfig, PretrainConfig, TrainConfig, resolve_repo_path
from numerics.adamw8bit import adamw8bit_problems
from numerics.float8 import float8_problems, float8_recipe
from pretrain.model import ModelConfig, Transformer


@dataclass
class LaunchCheck:
    """What `check_launch` found: problems (one line each), notes for the start of the run, and facts."""

    config: PretrainConfig
    """The config with model.vocab_size taken from the data when the data could be read."""
    ds_config: dict[str, Any] | None = None
    """DeepSpeed's merged JSON (None when the world size is unknown or the JSON has problems)."""
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """Not errors, but worth a line when training starts (e.g. evaluation skipped)."""
    vocab: int | None = None
    shard_dirs: int = 0
    train_tokens: int = 0
    valid_tokens: int = 0
    params: int | None = None
    checkpoint_space: Any = None
    """pretrain.checkpoint_space.CheckpointSpace, with `checkpoints_at_once`."""

    def raise_problems(self) -> None:
        if self.problems:
            raise LmforgeError("\n".join(" ".join(p.split()) for p in self.problems))


def _data_vocab(data: DataConfig, verify: bool, found: LaunchCheck) -> int | None:
    """Every shard directory's manifest (and checksums when `verify`), one tokenizer; its vocabulary."""
    from data_prep.manifest import load_manifest, verify_manifest
    from data_prep.tokenizer import Tokenizer

    manifests = []
    for path in data.path:
        shard_dir = resolve_repo_path(path)
        if not (shard_dir / "manifest.json").is_file():
            found.problems.append(f"data.path = {shard_dir}: no manifest.json there; make the shards with "
                                  f"`lmforge prep shards --input ... --tokenizer ... --output {shard_dir}`")
            continue
        try:
            manifests.append(load_manifest(shard_dir))
        except LmforgeError as err:
            found.problems += str(err).splitlines()
    if len(manifests) < len(data.path):
        return None
    if len({m.tokenizer.fingerprint for m in manifests}) > 1:
        listing = ", ".join(f"{m.directory} ({m.tokenizer.fingerprint[:12]})" for m in manifests)
        found.problems.append(f"data.path: shard sets were made with different tokenizers: {listing}")
        return None
    if verify:  # sizes and sha256 of every file (cached per file, size and mtime: training does not hash twice)
        for manifest in manifests:
            try:
                verify_manifest(manifest.directory)
            except LmforgeError as err:
                found.problems += str(err).splitlines()
        if found.problems:
            return None
    vocab = manifests[0].tokenizer.vocab_size
    try:
        file_vocab = Tokenizer.load(manifests[0].tokenizer_copy).vocab_size
    except Exception as err:  # sentencepiece raises plain RuntimeError/OSError for a bad file
        found.problems.append(f"{manifests[0].tokenizer_copy}: unreadable tokenizer ({err}); regenerate with `lmforge prep shards`")
        return None
    if file_vocab != vocab:
        found.problems.append(f"{manifests[0].tokenizer_copy}: {file_vocab} tokens but its manifest says {vocab}; "
                              "regenerate with `lmforge prep shards`")
        return None
    found.shard_dirs = len(manifests)
    found.train_tokens = sum(m.tokens("train") for m in manifests)
    found.valid_tokens = sum(m.tokens("valid") for m in manifests)
    return vocab


def _saved_zero_stage(run_dir: Path) -> int | None:
    """The ZeRO stage of the run dir's latest checkpoint (its COMPLETE record), None for a fresh run or an
    unreadable record (the resume, pretrain.resume.plan, says what is wrong). Read before the engine is
    chosen (pretrain.ds_config.as_zero0_on_one_rank), without importing DeepSpeed; nothing is verified."""
    import json

    from lmforge.run_layout import CHECKPOINTS_DIR, COMPLETE_MARKER, LATEST_FILE

    root = Path(run_dir) / CHECKPOINTS_DIR
    try:
        latest = root / LATEST_FILE
        tags = sorted(p.name for p in root.iterdir() if (p / COMPLETE_MARKER).is_file()) if root.is_dir() else []
        tag = latest.read_text().strip() if latest.is_file() else (tags[-1] if tags else None)
        record = json.loads((root / tag / COMPLETE_MARKER).read_text()) if tag else None
    except (OSError, ValueError):
        return None
    stage = record.get("zero_stage") if isinstance(record, dict) else None
    return stage if isinstance(stage, int) else None


def _deepspeed(config: PretrainConfig, world_size: int | None, found: LaunchCheck) -> None:
    from lmforge.distributed import bf16_supported
    from parallel.degrees import degree_problems
    from parallel.sequence import sequence_parallel_problems
    from parallel.tensor import tensor_parallel_json_problems, with_tensor_parallel
    from pretrain.ds_config import (as_zero0_on_one_rank, build_deepspeed_config, checkpoint_writer_problems,
                                    for_one_zero_rank, optimizer_json_problems, read_deepspeed_json, zero_stage_of)
    from pretrain.ds_json_checks import deepspeed_json_problems, precision_problems
    from pretrain.pipeline import configure_pipeline, data_parallel_size

    path = resolve_repo_path(config.deepspeed.config)
    try:
        raw = read_deepspeed_json(path)
    except LmforgeError as err:
        found.problems += str(err).splitlines()
        return
    problems = deepspeed_json_problems(raw, path)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    problems += precision_problems(raw, path, gpu, bf16_supported())
    problems += tensor_parallel_json_problems(raw, config.parallel.tensor, str(path))
    problems += checkpoint_writer_problems(config.train.checkpoint_writer, raw, path)
    problems += optimizer_json_problems(config.train.optimizer, raw, path, config.parallel.pipeline_stages)
    if not problems:  # the stage is read from a JSON that passed its checks
        if world_size is not None:
            problems += degree_problems(config.parallel, world_size, config.model, config.train.seq_len, zero_stage_of(raw))
        problems += sequence_parallel_problems(config.parallel, zero_stage_of(raw), config.deepspeed.config)
    found.problems += problems
    if problems or world_size is None:
        return
    try:
        ds_config = build_deepspeed_config(path, config.train, data_parallel_size(config.parallel, world_size), bf16_supported())
        ds_config = configure_pipeline(ds_config, config.parallel, config.model, world_size)
        note = None
        if config.deepspeed.one_rank_zero0:
            ds_config, note = as_zero0_on_one_rank(ds_config, world_size, _saved_zero_stage(config.run.dir))
        if note is None:
            ds_config, note = for_one_zero_rank(ds_config, data_parallel_size(config.parallel, world_size) * config.parallel.sequence)
        found.notes += [note] if note else []
        found.ds_config = with_tensor_parallel(ds_config, config.parallel.tensor)
    except LmforgeError as err:
        found.problems += str(err).splitlines()
        return
    from parallel.experts import expert_parallel_problems
    from pretrain.ds_config import zero_stage_of

    found.problems += expert_parallel_problems(config.parallel.expert, config.model.n_experts,
                                               data_parallel_size(config.parallel, world_size),
                                               zero_stage_of(found.ds_config), config.parallel.pipeline_stages)


def _datasets(config: PretrainConfig, found: LaunchCheck) -> None:
    """Opens the shards as training will (index against .bin: dtype, sizes, windows); a valid split
    too small for one sequence is a note (evaluation is skipped), not an error."""
    from data_prep.packed_dataset import build_dataset

    paths = [resolve_repo_path(p) for p in config.data.path]
    seq_len, seed = config.train.seq_len, config.train.seed
    try:
        build_dataset(paths, config.data.weights, "train", seq_len, seed)
    except LmforgeError as err:
        found.problems += str(err).splitlines()
        return
    try:
        build_dataset(paths, config.data.weights, "valid", seq_len, seed)
    except LmforgeError:
        found.notes.append(
            f"the valid split of data.path has {found.valid_tokens:,} tokens, fewer than one sequence of "
            f"train.seq_len + 1 = {seq_len + 1}: no evaluation (val_loss) in this run; make the shards with a larger "
            "--valid-fraction or lower train.seq_len"
        )


def nearest_existing(path: Path) -> Path:
    return next((p for p in (path, *path.parents) if p.exists()), Path.cwd())


def run_dir_problem(run_dir: Path) -> str | None:
    """Why run.dir could not be created and written, judged without creating anything; None if it can."""
    existing = nearest_existing(run_dir)
    if not existing.is_dir():
        return f"run.dir = {run_dir}: not writable (Not a directory)"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"run.dir = {run_dir}: not writable (Permission denied at {existing})"
    return None


def checkpoints_written(train: TrainConfig) -> int:
    """Checkpoints a run from step 0 writes: one per save_interval and one at the end (a preemption adds one)."""
    if not train.save_interval:
        return 1
    return train.max_steps // train.save_interval + (1 if train.max_steps % train.save_interval else 0)


def checkpoints_at_once(train: TrainConfig) -> int:
    """At most keep_last + 1 on disk (a new one completes before the oldest goes), never more than are written."""
    return min(train.keep_last + 1, checkpoints_written(train))


def parameter_count(model: ModelConfig) -> int:
    """Parameters of the model: built on the CPU when small, else on the meta device (no memory, any size)."""
    import contextlib

    from pretrain.model import matmul_params

    small = matmul_params(model) < 20_000_000
    with contextlib.nullcontext() if small else torch.device("meta"):
        return Transformer(model).num_params()


def disk_space_problem(run_dir: Path, params: int, train: TrainConfig):
    """(CheckpointSpace, problem or None) for the checkpoints that will be on run.dir's disk at once."""
    from pretrain.checkpoint_space import BYTES_PER_PARAM, CheckpointSpace, human_bytes

    count = checkpoints_at_once(train)
    each = params * BYTES_PER_PARAM
    existing = sum(p.stat().st_size for p in (run_dir / "checkpoints").rglob("*") if p.is_file()) if (run_dir / "checkpoints").is_dir() else 0
    space = CheckpointSpace(each, max(each, each * count - existing), shutil.disk_usage(nearest_existing(run_dir)).free)
    if space.bytes_needed <= space.bytes_free:
        return space, None
    why = (f"up to {count} on disk with train.keep_last = {train.keep_last}" if count > 1
           else "1 written (train.save_interval = 0)")
    return space, (f"run.dir = {run_dir}: {human_bytes(space.bytes_free)} free, but checkpoints need {human_bytes(space.bytes_needed)} "
                   f"(~{human_bytes(each)} each: {params:,} params × {BYTES_PER_PARAM} bytes, {why}); "
                   "free space, lower train.keep_last or move run.dir")


def check_launch(config: PretrainConfig, world_size: int | None, verify_checksums: bool = True) -> LaunchCheck:
    """Every check of a launch of `config` on `world_size` ranks (None: unknown, the JSON is judged alone).

    Writes nothing. The returned config has model.vocab_size from the data when it could be read."""
    found = LaunchCheck(config)
    model = config.model
    if model.arch == "gpt2" and model.kv_heads != model.n_heads:  # trains, but HF's GPT-2 could never load it
        found.problems.append(f"model.n_kv_heads = {model.n_kv_heads}: a gpt2 model has one key/value head per query head "
                              f"(HF's GPT2LMHeadModel has no grouped-query attention, so it could never be exported); "
                              f"set it to null or {model.n_heads}, or use model.arch = llama")
    vocab = _data_vocab(config.data, verify_checksums, found)
    if vocab is not None and config.model.vocab_size is not None and config.model.vocab_size != vocab:
        found.problems.append(f"model.vocab_size = {config.model.vocab_size} but the tokenizer of data.path has {vocab} tokens; "
                              "set model.vocab_size to null to take the tokenizer's")
        vocab = None
    if vocab is not None:
        found.vocab = vocab
        config = found.config = replace(config, model=config.model.with_vocab(vocab))
    _deepspeed(config, world_size, found)
    found.problems += _numerics_problems(config, found.ds_config)
    if vocab is not None:
        _datasets(config, found)
    problem = run_dir_problem(config.run.dir) or _ownership_problem(config)
    if problem:
        found.problems.append(problem)
    elif vocab is not None:
        found.params = parameter_count(config.model)
        found.checkpoint_space, problem = disk_space_problem(config.run.dir, found.params, config.train)
        if problem:
            found.problems.append(problem)
    return found


def _numerics_problems(config: PretrainConfig, ds_config: dict[str, Any] | None) -> list[str]:
    """What the numerics/ options (train.float8, train.optimizer, model.loss_chunk_tokens) need of this machine and run."""
    from pretrain.ds_config import zero_stage_of

    device = torch.device("cuda") if torch.cuda.is_available() else None
    found = float8_problems(config.train.float8, device)
    train = config.train
    if train.compile and train.compile_scope == "nested" and float8_recipe(train.float8, device) != "off":
        # Measured on an H100 (torch 2.11, torchao 0.17): inductor raises NotImplementedError on aten.to.dtype
        # of torchao's float8 tensor inside the nested region (docs/performance.md).
        found.append(f"train.compile_scope = nested: not supported with train.float8 = {train.float8!r} (inductor cannot "
                     "compile torchao's float8 linear inside a nested compile region); use compile_scope: model, "
                     "or train.float8 = off")
    found += adamw8bit_problems(train.optimizer)
    chunk = config.model.loss_chunk_tokens
    if chunk and ds_config is not None and (zero_stage_of(ds_config) == 3 or config.parallel.pipeline_stages > 1):
        found.append(f"model.loss_chunk_tokens = {chunk}: the chunked head runs at ZeRO 0-2 without pipeline stages "
                     "(ZeRO-3 partitions the head's weight); set it to 0")
    return found


def _ownership_problem(config: PretrainConfig) -> str | None:
    """run.dir may be written by `lmforge train` (lmforge.ownership: not an input, not another kind of folder)."""
    from lmforge import ownership

    try:
        ownership.check_output(config.run.dir, "run", "train", "run.dir", ownership.config_paths(config), resolve_repo_path)
    except LmforgeError as err:
        return str(err)
    return None


def check_run_dir(run_dir: Path) -> None:
    """Creates run.dir and writes a probe file in it; an OSError becomes one line. Call it only once
    every check has passed."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write_probe{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise LmforgeError(f"run.dir = {run_dir}: not writable ({err.strerror})") from None


def check_disk_space(run_dir: Path, model: ModelConfig, train: TrainConfig) -> None:
    """Raises the disk-space problem of `disk_space_problem`, if any."""
    _, problem = disk_space_problem(run_dir, parameter_count(model), train)
    if problem:
        raise LmforgeError(problem)
