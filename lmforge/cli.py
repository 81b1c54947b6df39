"""The `lmforge` command: one verb per thing a user does, each owned by the package that does it.

VERBS is the registry of verbs: verb -> (module, summary). The folder of each module is the stage
that does the work (README.md's layout table): data_prep/ (prep), pretrain/ (train), posttrain/
(sft, reward, ppo, dpo, grpo), run_tools/ (eval, generate, plot, export-hf, import-hf), launch/ (preflight).
Modules are named as strings and imported lazily (importlib) so `lmforge --help` is instant and a
verb's heavy imports (torch, deepspeed) happen only when it runs; because they are strings, lmforge/,
the lowest layer of the import order (.importlinter), does not import the stages above it. Each
target is a `main(argv) -> int` function.
"""
from __future__ import annotations

import importlib
import sys
from typing import Sequence

from lmforge.errors import LmforgeError, USER_ERROR_EXIT_CODE, run_cli
from lmforge.launcher_env import launcher_rank

VERBS: dict[str, tuple[str, str]] = {
    "prep": ("data_prep.cli", "text -> tokenizer and Megatron-format shards (tokenizer|shards|verify)"),
    "train": ("pretrain.train", "pretrain a model with DeepSpeed from a YAML config"),
    "eval": ("run_tools.evaluate", "loss, perplexity and bits per byte of a checkpoint on held-out shards"),
    "generate": ("run_tools.generate", "sample text from a checkpoint (temperature, top-k, top-p, KV cache)"),
    "plot": ("run_tools.plot", "write RUN_DIR/loss.png from RUN_DIR/metrics.jsonl"),
    "preflight": ("launch.preflight", "check a config, its DeepSpeed JSON, data and hosts before any GPU work"),
    "export-hf": ("run_tools.export_hf", "write a checkpoint as a Hugging Face transformers model"),
    "import-hf": ("run_tools.import_hf", "turn a Hugging Face Llama/GPT-2 checkpoint into an lmforge run"),
    "sft": ("posttrain.sft", "supervised fine-tuning on prompt/response data"),
    "reward": ("posttrain.reward_model", "train a reward model on preference pairs"),
    "ppo": ("posttrain.ppo", "RLHF with PPO against a reward model"),
    "dpo": ("posttrain.dpo", "direct preference optimisation against a frozen reference"),
    "grpo": ("posttrain.grpo", "GRPO: group-relative policy optimisation with verifiable rewards (no critic)"),
}

# What importing a verb's module loads, where that takes seconds: said on rank 0 before the import, so a
# user sees a line at once rather than nothing while torch and DeepSpeed load (issue 13).
LOADING: dict[str, str] = {verb: "torch and DeepSpeed" for verb in ("train", "sft", "reward", "ppo", "dpo", "grpo")}


def usage() -> str:
    width = max(len(v) for v in VERBS)
    lines = ["usage: lmforge VERB [ARGS...]   (lmforge VERB --help for a verb's options)", "", "verbs:"]
    lines += [f"  {verb:<{width}}  {summary}" for verb, (_, summary) in VERBS.items()]
    return "\n".join(lines)


def dispatch(argv: Sequence[str] | None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if args else USER_ERROR_EXIT_CODE
    verb, rest = args[0], args[1:]
    if verb not in VERBS:
        import difflib

        close = difflib.get_close_matches(verb, VERBS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; verbs: {', '.join(VERBS)}"
        raise LmforgeError(f"unknown verb '{verb}'{hint}")
    if verb in LOADING and VERBS[verb][0] not in sys.modules and not {"-h", "--help"} & set(rest) and launcher_rank() == 0:
        print(f"lmforge {verb}: loading {LOADING[verb]}", flush=True)
    module = importlib.import_module(VERBS[verb][0])
    return int(module.main(rest) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    sys.exit(run_cli(dispatch, argv))


if __name__ == "__main__":
    main()
