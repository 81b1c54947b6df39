"""The alignment demo: `python -m posttrain.demo [--work DIR] [--pretrained RUN_DIR]`, no download needed.

A verifiable preference from the default corpus (the Python standard library):
1. a pretrained run: --pretrained, else a small one trained here (`lmforge prep` + `lmforge train`);
2. prompts: prefixes of stdlib functions, from files pretraining trained on (for training) and from
   its held-out valid split (for measuring);
3. pairs: completions sampled from the pretrained model, a completion that keeps the program valid
   Python (posttrain.pysyntax, `ast.parse`) preferred over one that does not;
4. `lmforge reward` on the pairs, `lmforge ppo` against that reward model, `lmforge dpo` on the pairs,
   `lmforge grpo` with the rule itself (python_syntax) as its verifiable reward (--methods picks);
5. the valid rate of completions of the held-out prompts, before (pretrained) and after (PPO, DPO,
   GRPO), same sampling settings and seed: WORK/results.json and a table on stdout.

Each step is skipped when its output exists, so a rerun continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from data_prep.manifest import MANIFEST_FILE
from lmforge.errors import LmforgeError, run_cli
from lmforge.files import write_atomic
from lmforge.run_layout import CHECKPOINTS_DIR, LATEST_FILE, TOKENIZER_COPY, config_path

REPO = Path(__file__).resolve().parent.parent
SAMPLING = {"max_new_tokens": 32, "temperature": 0.8, "max_prompt_len": 96}
"""One sampling setting for the pairs, PPO's and GRPO's rollouts and the before/after measurement."""
METHODS = ("ppo", "dpo", "grpo")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m posttrain.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/align-demo"), help="output directory (default: runs/align-demo)")
    parser.add_argument("--pretrained", type=Path, default=None,
                        help="a pretrained run on the stdlib shards; default: train a small one in WORK/pretrain")
    parser.add_argument("--pretrain-steps", type=int, default=800, help="steps of the small pretraining run (default: 800)")
    parser.add_argument("--train-prompts", type=int, default=768, help="prompts sampled for pairs and PPO (default: 768)")
    parser.add_argument("--eval-prompts", type=int, default=256, help="held-out prompts measured (default: 256)")
    parser.add_argument("--samples", type=int, default=4, help="completions per prompt (default: 4)")
    parser.add_argument("--methods", default="ppo,dpo,grpo",
                        help="comma-separated alignment methods to run and measure (default: ppo,dpo,grpo)")
    parser.add_argument("--grpo-steps", type=int, default=None, help="GRPO iterations (default: demo-grpo.yaml's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if unknown := sorted(set(args.methods) - set(METHODS)):
        parser.error(f"--methods: unknown {', '.join(unknown)}; expected some of {', '.join(METHODS)}")
    return args


def lmforge(*args: str) -> None:
    """Runs one `lmforge` command (the same a user would type), streaming its output; a failure stops the demo."""
    print("$ lmforge " + " ".join(args), flush=True)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-m", "lmforge.cli", *args], cwd=REPO, env=env)
    if result.returncode != 0:
        raise LmforgeError(f"`lmforge {args[0]}` failed (exit {result.returncode}); see its output above")


def sets(**values) -> list[str]:
    out = []
    for key, value in values.items():
        out += ["--set", f"{key.replace('__', '.')}={value}"]
    return out


def pretrain(work: Path, steps: int) -> Path:
    tokenizer, shards, run = work / "tokenizer", work / "shards", work / "pretrain"
    if not (tokenizer / TOKENIZER_COPY).is_file():
        lmforge("prep", "tokenizer", "--input", "stdlib", "--vocab-size", "1024", "--output", str(tokenizer))
    if not (shards / MANIFEST_FILE).is_file():
        lmforge("prep", "shards", "--input", "stdlib", "--tokenizer", str(tokenizer / TOKENIZER_COPY), "--output", str(shards))
    lmforge("train", "--config", "tiny", *sets(
        run__dir=run, data__path=f"[{shards}]", model__d_model=128, model__n_layers=3, model__max_seq_len=256,
        train__seq_len=128, train__micro_batch_size=16, train__max_steps=steps, train__warmup_steps=max(1, steps // 20),
        train__save_interval=steps, train__eval_interval=steps, run__log_interval=100))
    return run


def shard_manifest(pretrained: Path) -> Path:
    from lmforge.config import read_yaml_mapping

    data = read_yaml_mapping(config_path(pretrained)).get("data") or {}
    paths = data.get("path") or []
    manifest = Path(paths[0] if isinstance(paths, list) and paths else str(paths)) / MANIFEST_FILE
    if not manifest.is_file():
        raise LmforgeError(f"{pretrained}: its shards' manifest.json was not found ({manifest}); "
                           "the demo needs a run pretrained on `lmforge prep shards --input stdlib`")
    return manifest


def load_model(run_dir: Path):
    from data_prep.tokenizer import Tokenizer
    from posttrain.job import load_weights, run_model_config, run_tokenizer_path
    from pretrain.model import Transformer
    from pretrain.run_weights import run_state_dict

    model = Transformer(run_model_config(run_dir))
    state, tag = run_state_dict(run_dir)
    load_weights(model, state, f"{run_dir} {tag}")
    return model.eval(), Tokenizer.load(run_tokenizer_path(run_dir))


def make_data(work: Path, pretrained: Path, args: argparse.Namespace) -> dict:
    from posttrain.demo_data import complete, preference_pairs, stdlib_prompt_split, validity, write_jsonl

    data = work / "data"
    stats_path = data / "stats.json"
    if stats_path.is_file():
        return json.loads(stats_path.read_text())
    split = stdlib_prompt_split(shard_manifest(pretrained), args.train_prompts, args.eval_prompts, args.seed)
    train = [p.prompt for p in split.train]
    model, tokenizer = load_model(pretrained)
    completions = complete(model, tokenizer, train, args.samples, SAMPLING["max_new_tokens"], SAMPLING["temperature"],
                           args.seed, SAMPLING["max_prompt_len"])
    pairs = preference_pairs(train, completions, pairs_per_prompt=2, seed=args.seed)
    write_jsonl(data / "preferences.jsonl", pairs)
    write_jsonl(data / "prompts.jsonl", [{"prompt": p} for p in train])
    write_jsonl(data / "eval_prompts.jsonl", [{"prompt": p.prompt, "source": p.source} for p in split.held_out])
    stats = {"train_prompts": len(train), "eval_prompts": len(split.held_out), "pairs": len(pairs),
             "pretrained_on_train_prompts": validity(train, completions).as_dict()}
    write_jsonl(data / "samples.jsonl", [{"prompt": p, "completions": c} for p, c in zip(train[:50], completions[:50])])
    write_atomic(stats_path, json.dumps(stats, indent=2))
    return stats


def finished(run_dir: Path) -> bool:
    return (run_dir / CHECKPOINTS_DIR / LATEST_FILE).is_file()


def align(work: Path, pretrained: Path, methods: Sequence[str], grpo_steps: int | None = None) -> None:
    data = work / "data"
    if "ppo" in methods and not finished(work / "reward"):
        lmforge("reward", "--config", "demo-reward", *sets(init__from_run=pretrained, run__dir=work / "reward",
                                                             data__train=data / "preferences.jsonl"))
    if "ppo" in methods and not finished(work / "ppo"):
        lmforge("ppo", "--config", "demo-ppo", *sets(init__from_run=pretrained, run__dir=work / "ppo",
                                                       ppo__reward_run=work / "reward", data__train=data / "prompts.jsonl",
                                                       ppo__max_new_tokens=SAMPLING["max_new_tokens"],
                                                       ppo__temperature=SAMPLING["temperature"]))
    if "dpo" in methods and not finished(work / "dpo"):
        lmforge("dpo", "--config", "demo-dpo", *sets(init__from_run=pretrained, run__dir=work / "dpo",
                                                       data__train=data / "preferences.jsonl"))
    if "grpo" in methods and not finished(work / "grpo"):
        steps = {} if grpo_steps is None else {"train__max_steps": grpo_steps}
        lmforge("grpo", "--config", "demo-grpo", *sets(init__from_run=pretrained, run__dir=work / "grpo",
                                                         data__train=data / "prompts.jsonl",
                                                         grpo__max_new_tokens=SAMPLING["max_new_tokens"],
                                                         grpo__temperature=SAMPLING["temperature"], **steps))


def measure(work: Path, pretrained: Path, args: argparse.Namespace) -> dict:
    """Valid rate of the held-out prompts' completions for the pretrained model and each method's run."""
    from posttrain.demo_data import complete, validity
    from posttrain.formats import iter_jsonl

    prompts = [r["prompt"] for r in iter_jsonl(work / "data" / "eval_prompts.jsonl")]
    results = {}
    for name, run_dir in (("pretrained", pretrained), *((m, work / m) for m in args.methods)):
        model, tokenizer = load_model(run_dir)
        completions = complete(model, tokenizer, prompts, args.samples, SAMPLING["max_new_tokens"],
                               SAMPLING["temperature"], args.seed + 1, SAMPLING["max_prompt_len"])
        results[name] = validity(prompts, completions).as_dict()
    return results


def reward_accuracy(work: Path) -> dict:
    from pretrain.metrics import read_metrics

    if not (work / "reward").is_dir():
        return {}
    evals = [r for r in read_metrics(work / "reward") if "val_accuracy" in r]
    return {"val_accuracy": evals[-1]["val_accuracy"], "val_margin": evals[-1]["val_margin"]} if evals else {}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    pretrained = args.pretrained.resolve() if args.pretrained else pretrain(work, args.pretrain_steps)
    stats = make_data(work, pretrained, args)
    print(f"data: {stats['pairs']} preference pairs from {stats['train_prompts']} prompts "
          f"(pretrained valid rate there {stats['pretrained_on_train_prompts']['valid_rate']:.3f}); "
          f"{stats['eval_prompts']} held-out prompts", flush=True)
    align(work, pretrained, args.methods, args.grpo_steps)
    results = measure(work, pretrained, args)
    summary = {"sampling": SAMPLING, "samples_per_prompt": args.samples, "data": stats,
               "reward_model": reward_accuracy(work), "held_out": results,
               "seconds": round(time.perf_counter() - started, 1)}
    write_atomic(work / "results.json", json.dumps(summary, indent=2))
    print("\nvalid Python completions of held-out stdlib function prefixes "
          f"({stats['eval_prompts']} prompts × {args.samples} samples, T={SAMPLING['temperature']}):")
    print("| model | valid rate | valid code lines / completion | chars / completion |")
    print("| --- | --- | --- | --- |")
    for name, r in results.items():
        print(f"| {name} | {r['valid_rate']:.3f} | {r['valid_code_lines']:.2f} | {r['mean_chars']:.0f} |")
    print(f"reward model held-out accuracy: {summary['reward_model'].get('val_accuracy', float('nan')):.3f}; "
          f"total {summary['seconds']:.0f}s; {work / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
