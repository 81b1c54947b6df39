"""The alignment table: `python -m posttrain.alignment_table --out DIR`, GRPO and PPO from one SFT run, CI-sized.

1. a small pretrained run on the default corpus (posttrain.demo.pretrain: `lmforge prep` + `lmforge train`);
2. `lmforge sft` on stdlib function prefixes (files pretraining trained on) -> the function's next
   statement (posttrain.pysyntax.FunctionPrompt.continuation);
3. the share of completions of held-out function prefixes (the shards' valid split) that keep the
   program valid Python (`ast.parse`, posttrain.pysyntax) with fixed sampling settings and seed: before;
4. `lmforge grpo` and `lmforge ppo` from that SFT run with the python_syntax reward, the same rollouts
   per iteration and the same iterations (configs/posttrain/table-*.yaml), each measured as in 3: after;
5. one table (method, iterations, share before, share after, ratio, wall time) on stdout and in DIR/table.json.

Each run is skipped when its checkpoint exists (its wall time is then the one recorded when it ran); OUT/settings.json
records the settings, and a rerun with others into the same OUT is refused.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from lmforge.errors import LmforgeError, run_cli
from lmforge.files import write_atomic
from posttrain.demo import REPO, finished, lmforge, load_model, pretrain, sets, shard_manifest

METHODS = ("grpo", "ppo")
TABLE_FILE = "table.json"
SETTINGS_FILE = "settings.json"


@dataclass(frozen=True)
class TableSettings:
    """What the table's runs and measurements use; the defaults fit CI (2 CPU cores, a few minutes)."""

    pretrain_steps: int = 200
    """Steps of the small pretraining run (0.85M-parameter Llama, 2,048 tokens a step)."""
    sft_steps: int = 100
    """SFT steps (16 examples each) on prefix -> next-statement pairs."""
    iterations: int = 40
    """GRPO and PPO iterations (train.max_steps of each), one rollout batch each."""
    prompts_per_iteration: int = 8
    """Prompts per iteration; GRPO samples group_size responses to each, PPO one to each of as many prompts."""
    group_size: int = 8
    """GRPO's responses per prompt (PPO's rollout batch is prompts_per_iteration × group_size prompts)."""
    lr: float = 5.0e-4
    """Policy learning rate of both methods (constant)."""
    train_prompts: int = 512
    """Function prefixes from training files: SFT examples and the RL prompts."""
    eval_prompts: int = 64
    """Held-out function prefixes measured before and after."""
    samples: int = 4
    """Completions measured per held-out prompt."""
    max_new_tokens: int = 24
    """Tokens sampled per completion, in the rollouts and in the measurement."""
    temperature: float = 1.0
    """Sampling temperature, in the rollouts and in the measurement."""
    seed: int = 0
    """Seed of the prompt split (the measurement samples with seed + 1)."""


def parse_args(argv: Sequence[str] | None) -> tuple[Path, TableSettings, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m posttrain.alignment_table", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/align-table"), help="output directory (default: runs/align-table)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, some of grpo,ppo (default: both)")
    defaults = TableSettings()
    for name, value in asdict(defaults).items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value,
                            help=f"(default: {value})")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if unknown := sorted(set(methods) - set(METHODS)):
        parser.error(f"--methods: unknown {', '.join(unknown)}; expected some of {', '.join(METHODS)}")
    settings = TableSettings(**{name: getattr(args, name) for name in asdict(defaults)})
    if problems := settings_problems(settings):
        raise LmforgeError("\n".join(problems))
    return args.out, settings, methods


def settings_problems(s: TableSettings) -> list[str]:
    found = [f"--{name.replace('_', '-')} = {getattr(s, name)}: must be at least 1"
             for name in ("pretrain_steps", "sft_steps", "iterations", "prompts_per_iteration", "train_prompts",
                          "eval_prompts", "samples", "max_new_tokens") if getattr(s, name) < 1]
    if s.group_size < 2:
        found.append(f"--group-size = {s.group_size}: must be at least 2 (GRPO compares responses to one prompt)")
    found += [f"--{name} = {getattr(s, name)}: must be positive" for name in ("temperature", "lr") if not getattr(s, name) > 0]
    return found


class Timings:
    """Wall seconds of each run, kept in OUT/timings.json so that a rerun that skips a run still reports it."""

    def __init__(self, path: Path):
        self.path = path
        self.seconds: dict[str, float] = json.loads(path.read_text()) if path.is_file() else {}

    def run(self, name: str, *args: str) -> None:
        started = time.perf_counter()
        lmforge(*args)
        self.seconds[name] = round(time.perf_counter() - started, 1)
        write_atomic(self.path, json.dumps(self.seconds, indent=2))


def write_data(out: Path, pretrained: Path, s: TableSettings) -> dict:
    """OUT/data/{sft,prompts,eval_prompts}.jsonl from the shards' train/valid split; returns their counts."""
    from posttrain.demo_data import stdlib_prompt_split, write_jsonl

    data = out / "data"
    split = stdlib_prompt_split(shard_manifest(pretrained), s.train_prompts, s.eval_prompts, s.seed)
    if len(split.held_out) < s.eval_prompts:
        raise LmforgeError(f"--eval-prompts = {s.eval_prompts}: the shards' valid split holds only "
                           f"{len(split.held_out)} function prefixes; lower it")
    write_jsonl(data / "sft.jsonl", [{"prompt": p.prompt, "response": p.continuation} for p in split.train])
    write_jsonl(data / "prompts.jsonl", [{"prompt": p.prompt} for p in split.train])
    write_jsonl(data / "eval_prompts.jsonl", [{"prompt": p.prompt, "source": p.source} for p in split.held_out])
    return {"train_prompts": len(split.train), "eval_prompts": len(split.held_out)}


def sampling_sets(verb: str, s: TableSettings) -> dict:
    return {f"{verb}__max_new_tokens": s.max_new_tokens, f"{verb}__temperature": s.temperature}


def train_policies(out: Path, pretrained: Path, s: TableSettings, methods: Sequence[str], timings: Timings) -> None:
    data = out / "data"
    if not finished(out / "sft"):
        timings.run("sft", "sft", "--config", "table-sft", *sets(
            init__from_run=pretrained, run__dir=out / "sft", data__train=data / "sft.jsonl", train__max_steps=s.sft_steps))
    common = dict(init__from_run=out / "sft", data__train=data / "prompts.jsonl", train__max_steps=s.iterations,
                  train__lr=s.lr, train__min_lr=s.lr, train__seed=s.seed)
    if "grpo" in methods and not finished(out / "grpo"):
        timings.run("grpo", "grpo", "--config", "table-grpo", *sets(
            run__dir=out / "grpo", grpo__prompts_per_rank=s.prompts_per_iteration, grpo__group_size=s.group_size,
            **sampling_sets("grpo", s), **common))
    if "ppo" in methods and not finished(out / "ppo"):
        timings.run("ppo", "ppo", "--config", "table-ppo", *sets(
            run__dir=out / "ppo", ppo__rollout_batch_size=s.prompts_per_iteration * s.group_size,
            **sampling_sets("ppo", s), **common))


def valid_share(run_dir: Path, prompts: Sequence[str], s: TableSettings) -> dict:
    """The held-out prompts' completions by the run's model: valid share, code lines, length."""
    from posttrain.demo_data import complete, validity

    model, tokenizer = load_model(run_dir)
    completions = complete(model, tokenizer, prompts, s.samples, s.max_new_tokens, s.temperature, s.seed + 1,
                           max_prompt_len=96)
    return validity(prompts, completions).as_dict()


def rollout_rewards(run_dir: Path, window: int = 5) -> dict:
    """Mean rollout reward (the python_syntax share of the training rollouts) over the first and last iterations."""
    from pretrain.metrics import read_metrics

    rewards = [r["reward"] for r in read_metrics(run_dir) if "reward" in r]
    if not rewards:
        return {}
    return {"first": sum(rewards[:window]) / len(rewards[:window]), "last": sum(rewards[-window:]) / len(rewards[-window:])}


def commit() -> str | None:
    """The checkout's commit, `-dirty` when it has uncommitted changes; None outside git."""
    result = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], cwd=REPO, capture_output=True, text=True)
    return result.stdout.strip() or None if result.returncode == 0 else None


def check_same_settings(out: Path, settings: TableSettings) -> None:
    """OUT's runs are reused, so they must have been made with these settings: OUT/settings.json records them.
    OUT is new, empty or this command's own (lmforge.ownership), judged before anything is written."""
    from lmforge import ownership

    ownership.check_output(out, "alignment-table", "alignment_table", "--out")
    path = out / SETTINGS_FILE
    wanted = asdict(settings)
    if path.is_file():
        recorded = json.loads(path.read_text())
        if changed := [f"--{k.replace('_', '-')} {recorded.get(k)} -> {v}" for k, v in wanted.items() if recorded.get(k) != v]:
            raise LmforgeError(f"{path}: the runs in {out} were made with other settings ({', '.join(changed)}); "
                               "use another --out, or delete it to start over")
    else:
        ownership.claim(out, "alignment-table", "alignment_table")
        write_atomic(path, json.dumps(wanted, indent=2))


def build_table(out: Path, s: TableSettings, methods: Sequence[str], timings: Timings, counts: dict) -> dict:
    from posttrain.formats import iter_jsonl

    prompts = [r["prompt"] for r in iter_jsonl(out / "data" / "eval_prompts.jsonl")]
    before = valid_share(out / "sft", prompts, s)
    rows = []
    for method in methods:
        after = valid_share(out / method, prompts, s)
        rows.append({
            "method": method, "iterations": s.iterations,
            "rollouts": s.iterations * s.prompts_per_iteration * s.group_size,
            "share_before": before["valid_rate"], "share_after": after["valid_rate"],
            "ratio": after["valid_rate"] / before["valid_rate"] if before["valid_rate"] else None,
            "seconds": timings.seconds.get(method), "after": after, "rollout_reward": rollout_rewards(out / method)})
    return {"settings": asdict(s), "data": counts, "before": {"model": "sft", **before}, "rows": rows,
            "run_seconds": timings.seconds, "commit": commit()}


def print_table(table: dict) -> None:
    s = table["settings"]
    print(f"\nshare of held-out function bodies that ast.parse accepts ({table['data']['eval_prompts']} prompts × "
          f"{s['samples']} samples, {s['max_new_tokens']} tokens, T={s['temperature']}), from one SFT run:")
    print("| method | iterations | rollouts | share before (SFT) | share after | ratio | wall s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in table["rows"]:
        ratio = "—" if r["ratio"] is None else f"{r['ratio']:.2f}"
        print(f"| {r['method']} | {r['iterations']} | {r['rollouts']} | {r['share_before']:.3f} | "
              f"{r['share_after']:.3f} | {ratio} | {r['seconds']} |")
    print(f"this invocation {table['seconds']:.0f}s (a skipped run reports its recorded time; commit {table['commit']})")


def main(argv: Sequence[str] | None = None) -> int:
    out, settings, methods = parse_args(argv)
    # The models are tiny: one thread per run is nearly as fast as two on an idle machine and does not
    # stall when the cores are shared (two threads' iterations went from 0.7 s to 6-23 s under load).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out = out.resolve()
    check_same_settings(out, settings)
    started = time.perf_counter()
    timings = Timings(out / "timings.json")
    pretrained = out / "pretrain"
    if not finished(pretrained):
        started_pretrain = time.perf_counter()
        pretrain(out, settings.pretrain_steps)
        timings.seconds["pretrain"] = round(time.perf_counter() - started_pretrain, 1)
        write_atomic(timings.path, json.dumps(timings.seconds, indent=2))
    counts = write_data(out, pretrained, settings)
    train_policies(out, pretrained, settings, methods, timings)
    table = build_table(out, settings, methods, timings, counts)
    table["seconds"] = round(time.perf_counter() - started, 1)
    write_atomic(out / TABLE_FILE, json.dumps(table, indent=2))
    print_table(table)
    print(f"{out / TABLE_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
