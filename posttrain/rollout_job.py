"""What a rollout verb (ppo, grpo) checks before any process group: the length budget, the prompts and
the reward source (a reward function, imported and signature-checked, or a reward-model run)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

from lmforge.errors import LmforgeError
from lmforge.run_layout import metrics_path
from posttrain.formats import PROMPT_SHAPE, parse_prompt, split_records
from posttrain.job import Job, run_model_config, run_tokenizer_path
from posttrain.template import render_prompt
from pretrain.config import TrainConfig, resolve_repo_path


def stretched_train_section(train: TrainConfig, updates_per_iteration: int) -> TrainConfig:
    """train.* with max_steps/warmup_steps in optimizer steps (the YAML counts iterations), for DeepSpeed's schedule."""
    n = max(1, updates_per_iteration)
    return replace(train, max_steps=train.max_steps * n, warmup_steps=train.warmup_steps * n)


def check_reward_source(job: Job, reward_run: Path | None, reward_function: str | None,
                        section: str) -> tuple[Path | None, Any]:
    """(the reward run resolved, its ModelConfig), or (None, None) for a reward function; one line on a problem."""
    from data_prep.tokenizer import Tokenizer
    from posttrain.reward_functions import resolve_reward_function

    if (reward_run is None) == (reward_function is None):
        raise LmforgeError(f"{section}.reward_run and {section}.reward_function: set exactly one "
                           "(a reward-model run, or a programmatic reward)")
    if reward_function is not None:
        resolve_reward_function(reward_function, f"{section}.reward_function")
        return None, None
    run = resolve_repo_path(reward_run)
    check_reward_run(run, section)
    config = run_model_config(run)
    if Tokenizer.load(run_tokenizer_path(run)).fingerprint != job.tokenizer.fingerprint:
        raise LmforgeError(f"{section}.reward_run = {run}: trained with another tokenizer than the policy's "
                           f"({job.config.init.tokenizer})")
    return run, config


def check_reward_run(run_dir: Path, section: str) -> None:
    """SECTION.reward_run must be a reward model (`lmforge reward`): a language model's scalar head does not
    exist, so every rollout would score 0. Told by the checkpoint record's verb (metrics for runs saved before it)."""
    import json

    from pretrain import checkpoint

    tag = checkpoint.latest_tag(run_dir)
    if tag is None:
        raise LmforgeError(f"{section}.reward_run = {run_dir}: no complete checkpoint there; train one with `lmforge reward`")
    record = checkpoint.read_record(checkpoint.checkpoints_dir(run_dir) / tag)
    verb = record.get("verb")
    if verb is None and "model" in record:
        verb = "train"  # only `lmforge train` puts the model section in its records
    if verb is None:  # a post-training run saved before records named the verb: reward runs log accuracy
        try:
            with open(metrics_path(run_dir), encoding="utf-8") as lines:
                verb = "reward" if "accuracy" in json.loads(next(lines, "{}")) else None
        except (OSError, ValueError):
            verb = None
    if verb != "reward":
        what = f"a '{verb}' run" if verb else "not a run of `lmforge reward`"
        raise LmforgeError(f"{section}.reward_run = {run_dir}: {what}, not a reward model (its scores would be "
                           "meaningless); set it to the run.dir of `lmforge reward`")


def rollout_prompts(job: Job, max_new_tokens: int, section: str) -> list[list[int]]:
    """data.train's prompts rendered and cut to data.max_prompt_len, after checking the length budget."""
    cfg = job.config
    total = cfg.data.max_prompt_len + max_new_tokens
    if total > cfg.model.max_seq_len:
        raise LmforgeError(f"data.max_prompt_len + {section}.max_new_tokens = {total}: must not exceed "
                           f"model.max_seq_len = {cfg.model.max_seq_len}")
    if cfg.data.train is None:
        raise LmforgeError("data.train is required: a JSONL file of " + PROMPT_SHAPE)
    records, _ = split_records(cfg.data.train, None, 0.0, parse_prompt, PROMPT_SHAPE)
    return [render_prompt(job.tokenizer, p, cfg.data.max_prompt_len) for p in records]


def run_rollout_verb(verb: str, description: str, argv: Sequence[str] | None, prepare: Callable[[Any, int], Any],
                     train_section: Callable[[Any], TrainConfig], make_trainer: Callable[[Any, Any], Any],
                     summary_keys: Sequence[str]) -> int:
    """The entry point of a rollout verb (ppo, grpo): every check (`prepare(config, world_size)`, whose
    result has `.job`), the ranks, the trainer (`make_trainer(prepared, info)`: the place DeepSpeed is
    imported), a finished run's "nothing to do", and the summary line."""
    import time

    from lmforge import distributed
    from posttrain.config import load_posttrain_config
    from posttrain.job import parse_args, start_ranks

    args = parse_args(verb, description, verb, argv)
    prepared = prepare(load_posttrain_config(args.config, args.set), distributed.launcher_world_size())
    job, info = start_ranks(prepared.job, train_section(prepared.job.config), verb=verb)
    if job is not prepared.job:  # MPI told the world size only now
        prepared = prepare(job.config, info.world_size)
    try:
        trainer = make_trainer(prepared, info)
        if trainer.step >= job.config.train.max_steps:
            if distributed.is_main():
                print(f"nothing to do: {job.config.run.dir} already at step {trainer.step} ≥ train.max_steps = "
                      f"{job.config.train.max_steps}", flush=True)
            return 0
        started = time.perf_counter()
        last = trainer.run()
        if distributed.is_main() and last:
            summary = ", ".join(f"{k}={last[k]:.4g}" for k in summary_keys if isinstance(last.get(k), float))
            print(f"{verb} done at iteration {trainer.step} ({time.perf_counter() - started:.0f}s): {summary}", flush=True)
    finally:
        distributed.shutdown()
    return 0
