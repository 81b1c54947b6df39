"""Which checkpoint a run resumes from, checked before the engine is built.

The rule: the checkpoint `latest` names (or, when `latest` is absent, the newest with a COMPLETE
record: a run killed between the two writes). Its files are checked against the record (sizes and
sha256, a share per rank) and its model section against the config. A missing or damaged file is
a one-line error naming it; only with `run.resume_fallback` (`--resume-fallback`) does the run
go back to the newest intact older checkpoint, marking the damaged one and pointing `latest` at
the one it used. A checkpoint saved on another number of data-parallel ranks is loaded through
DeepSpeed's universal format (pretrain.universal_checkpoint).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge import distributed
from lmforge.config import config_to_dict
from lmforge.errors import LmforgeError
from pretrain import checkpoint, universal_checkpoint
from pretrain.checkpoint import COMPLETE_MARKER, LATEST_FILE, checkpoints_dir

FALLBACK_HINT = "pass --resume-fallback (or --set run.resume_fallback=true)"


@dataclass(frozen=True)
class ResumePoint:
    tag: str
    record: dict[str, Any]
    """The checkpoint's COMPLETE record."""
    load_dir: Path | None
    """Where DeepSpeed loads the tag from, when not RUN_DIR/checkpoints (a universal copy)."""
    from_zero0: bool = False
    """ZeRO-0's checkpoint, loaded into ZeRO-1/2 (pretrain.universal_checkpoint.load_zero0_optimizer_state)."""


def _problem(run_dir: Path, tag: str) -> str | None:
    """Why `tag` cannot be resumed from (None: it is complete and intact)."""
    folder = checkpoints_dir(run_dir) / tag
    if not checkpoint.TAG_PATTERN.fullmatch(tag):
        return f"{checkpoints_dir(run_dir) / LATEST_FILE} names '{tag}', which is not a checkpoint tag"
    if not (folder / COMPLETE_MARKER).is_file():
        return f"{checkpoints_dir(run_dir) / LATEST_FILE} names '{tag}', which is missing or incomplete"
    try:
        damage = checkpoint.damage(run_dir, tag)
    except LmforgeError as err:  # the COMPLETE record itself is damaged (every rank reads the same file)
        return str(err)
    if damage:
        more = f" (and {len(damage) - 1} more)" if len(damage) > 1 else ""
        return damage[0] + more
    return None


def choose_tag(run_dir: Path, fallback: bool) -> str | None:
    """The tag to resume from, None for a fresh run; LmforgeError for a damaged one unless `fallback`."""
    latest = checkpoints_dir(run_dir) / LATEST_FILE
    complete = checkpoint.complete_tags(run_dir)
    tag = latest.read_text().strip() if latest.is_file() else (complete[-1] if complete else None)
    if tag is None:
        return None
    problem = _problem(run_dir, tag)
    if problem is None:
        return tag
    newest = checkpoint.step_of_tag(tag) if checkpoint.TAG_PATTERN.fullmatch(tag) else None
    older = [t for t in complete if t != tag and (newest is None or checkpoint.step_of_tag(t) < newest)]
    if not fallback:
        hint = (f"{FALLBACK_HINT} to resume from the previous complete checkpoint {older[-1]}" if older
                else "there is no earlier complete checkpoint; move the run dir away to start afresh")
        raise LmforgeError(f"{problem}; {hint}")
    for candidate in reversed(older):
        if _problem(run_dir, candidate) is None:
            if distributed.is_main():
                print(f"warning: {problem}; falling back to {checkpoints_dir(run_dir) / candidate}", flush=True)
                checkpoint.mark_damaged(run_dir, tag, problem, candidate)
            distributed.barrier()
            return candidate
    raise LmforgeError(f"{problem}; no intact earlier checkpoint to fall back to")


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value))


def check_model(record: dict[str, Any], model_config, folder: Path) -> None:
    """The checkpoint was written for this model (its record's `model` section equals the config's)."""
    saved = record.get("model")
    if saved is None:
        return
    current = _plain(config_to_dict(model_config))
    differences = [f"model.{key} = {saved.get(key)!r} there, {value!r} in the config"
                   for key, value in current.items() if saved.get(key) != value]
    if differences:
        raise LmforgeError(
            f"{folder}: written for a different model ({'; '.join(differences)}); resume with the model "
            "it was trained with, or train into a new run.dir"
        )


def data_identity(data) -> dict[str, Any]:
    """What a resumed run must read as the original did: the shard directories, their weights, and
    the tokenizer fingerprint their manifests name (None when a manifest cannot be read)."""
    from pretrain.config import resolve_repo_path

    paths = [resolve_repo_path(Path(p)) for p in data.path]
    fingerprints, contents = [], []
    for path in paths:
        try:
            manifest = json.loads((path / "manifest.json").read_text())
            fingerprints.append(manifest["tokenizer"]["fingerprint"])
            contents.append(manifest.get("corpus", {}).get("sha256") or manifest.get("run_key"))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            fingerprints.append(None)
            contents.append(None)
    return {"tokenizer_fingerprint": fingerprints[0] if len(set(fingerprints)) == 1 else fingerprints,
            "data": {"path": [str(Path(os.path.realpath(p))) for p in paths], "content": contents,
                     "weights": None if data.weights is None else list(data.weights)}}


def check_data(record: dict[str, Any], data, folder: Path) -> None:
    """The run reads the data the checkpoint was trained on: same tokenizer, shard directories and weights.

    Records written before these keys existed are not checked."""
    current = data_identity(data)
    saved_fp, now_fp = record.get("tokenizer_fingerprint"), current["tokenizer_fingerprint"]
    if saved_fp is not None and now_fp is not None and saved_fp != now_fp:
        raise LmforgeError(f"{folder}: trained on shards of another tokenizer (fingerprint {str(saved_fp)[:16]}... there, "
                           f"{str(now_fp)[:16]}... for data.path = {[str(p) for p in data.path]}); resume with the data "
                           "it was trained on, or train into a new run.dir")
    saved = record.get("data")
    if not isinstance(saved, dict):
        return
    # The shards are compared by content (their manifest's corpus hash), so a moved copy resumes.
    if "content" in saved and None not in saved["content"] + current["data"]["content"] and saved["content"] != current["data"]["content"]:
        raise LmforgeError(f"{folder}: trained on other shards (data.path = {saved.get('path')} there, "
                           f"{current['data']['path']} now, with other contents); resume with the data it was trained on, "
                           "or train into a new run.dir")
    if "weights" in saved and saved["weights"] != current["data"]["weights"]:
        raise LmforgeError(f"{folder}: trained with data.weights = {saved['weights']}, the config says "
                           f"{current['data']['weights']}; resume with the data it was trained on, or train into a new run.dir")


def plan(config, data_parallel_size: int, zero_stage: int) -> ResumePoint | None:
    """Picks and checks the checkpoint to resume from; converts it to universal format if the ranks changed."""
    run_dir = config.run.dir
    tag = choose_tag(run_dir, config.run.resume_fallback)
    if tag is None:
        return None
    folder = checkpoints_dir(run_dir) / tag
    record = checkpoint.read_record(folder)
    check_model(record, config.model, folder)
    check_decay_groups(record, config.train, folder)
    check_data(record, config.data, folder)
    saved_stages = record.get("pipeline_stages", 1)
    if saved_stages != config.parallel.pipeline_stages:
        raise LmforgeError(f"{folder}: written with parallel.pipeline_stages = {saved_stages}, the config says "
                           f"{config.parallel.pipeline_stages}; resume with the stages it was saved with")
    saved_tensor = record.get("tensor_parallel", 1)
    if saved_tensor != config.parallel.tensor:
        raise LmforgeError(f"{folder}: written with parallel.tensor = {saved_tensor}, the config says "
                           f"{config.parallel.tensor}; resume with the tensor degree it was saved with")
    saved_experts = record.get("expert_parallel", 1)  # DeepSpeed's MoE layers save experts per rank layout
    if saved_experts != config.parallel.expert:
        raise LmforgeError(f"{folder}: written with parallel.expert = {saved_experts}, the config says "
                           f"{config.parallel.expert}; resume with the expert degree it was saved with")
    load_dir = None
    if universal_checkpoint.loads_zero0_into_zero(record, zero_stage):
        if saved_experts > 1:
            raise LmforgeError(f"{folder}: an expert-parallel ZeRO-0 checkpoint cannot be resumed at ZeRO-{zero_stage}; "
                               "resume it with ds_configs/zero0.json")
        return ResumePoint(tag, record, None, from_zero0=True)
    if universal_checkpoint.loads_zero0_into_zero3(record, zero_stage):
        from pretrain.engine import parameter_group_names  # DeepSpeed's import: only when it converts
        if saved_experts > 1 or saved_tensor > 1:
            raise LmforgeError(f"{folder}: an expert- or tensor-parallel ZeRO-0 checkpoint cannot be resumed at ZeRO-3; "
                               "resume it with ds_configs/zero0.json")
        return ResumePoint(tag, record, universal_checkpoint.zero0_universal_copy(
            folder, parameter_group_names(config.model, config.train.decay_embeddings)))
    if universal_checkpoint.needs_universal(record, data_parallel_size, zero_stage, folder):
        if saved_experts > 1:
            raise LmforgeError(f"{folder}: an expert-parallel checkpoint of {record['data_parallel_size']} data-parallel ranks "
                               f"cannot be resumed on {data_parallel_size}; resume on as many ranks")
        if saved_stages > 1:
            raise LmforgeError(f"{folder}: a pipelined checkpoint of {record['data_parallel_size']} data-parallel replicas "
                               f"cannot be resumed on {data_parallel_size}; resume on as many replicas")
        if saved_tensor > 1:  # DeepSpeed's universal conversion of AutoTP shards is not verified in lmforge
            raise LmforgeError(f"{folder}: a tensor-parallel checkpoint of {record['data_parallel_size']} data-parallel replicas "
                               f"cannot be resumed on {data_parallel_size}; resume on as many replicas")
        load_dir = universal_checkpoint.universal_copy(folder)
    return ResumePoint(tag, record, load_dir)


def record_for(config, global_batch: int) -> dict[str, Any]:
    """What the trainer adds to each checkpoint's COMPLETE record, for these checks."""
    return {"model": _plain(config_to_dict(config.model)), "global_batch": global_batch, "seed": config.train.seed,
            "pipeline_stages": config.parallel.pipeline_stages, "tensor_parallel": config.parallel.tensor,
            "decay_embeddings": config.train.decay_embeddings,
            "expert_parallel": config.parallel.expert, **data_identity(config.data)}


def check_decay_groups(record: dict[str, Any], train, folder: Path) -> None:
    """The optimizer state was saved with this config's parameter groups (train.decay_embeddings)."""
    saved = record.get("decay_embeddings", False)  # records before the option: embeddings were exempt
    if saved != train.decay_embeddings:
        raise LmforgeError(f"{folder}: written with train.decay_embeddings = {str(saved).lower()}, the config says "
                           f"{str(train.decay_embeddings).lower()}: the optimizer's parameter groups differ; resume "
                           "with the value it was saved with, or train into a new run.dir")
