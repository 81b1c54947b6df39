"""`lmforge generate --checkpoint RUN_DIR --prompt TEXT`: sample from a trained run.

Any language-model run: pretraining, import-hf, SFT, DPO, PPO (its actor). The prompt is raw text after
an end-of-document token, which is also post-training's raw-prompt template (`</s> PROMPT`).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Sequence

import torch

from lmforge.errors import LmforgeError, run_cli
from pretrain.run_dir import load_run_tokenizer
from pretrain.sampling import generate
from run_tools.run_config import load_checked_model


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lmforge generate", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="run directory (its latest checkpoint)")
    parser.add_argument("--step", type=int, default=None, help="use the checkpoint of this step instead")
    parser.add_argument("--prompt", default="", help="text to continue (default: start of a document)")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    parser.add_argument("--top-k", type=int, default=50, help="0 disables")
    parser.add_argument("--top-p", type=float, default=0.95, help="1 disables")
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.max_new_tokens < 1 or args.num_samples < 1:
        raise LmforgeError("--max-new-tokens and --num-samples must be at least 1")
    if not (math.isfinite(args.temperature) and args.temperature >= 0 and args.top_k >= 0 and 0 < args.top_p <= 1):
        raise LmforgeError(f"--temperature {args.temperature}, --top-k {args.top_k}, --top-p {args.top_p}: expected "
                           "temperature >= 0 (0: greedy), top-k >= 0 (0: off) and 0 < top-p <= 1 (1: off)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, config, tag = load_checked_model(args.checkpoint, args.step)
    model = model.to(device)
    tokenizer = load_run_tokenizer(args.checkpoint, config.model)
    # Training saw documents after end-of-document tokens, never after BOS: start from EOD.
    ids = [tokenizer.eod_id] + tokenizer.encode(args.prompt)
    context = config.model.max_seq_len
    if len(ids) >= context:
        what = "fills" if len(ids) == context else "is longer than"
        raise LmforgeError(f"--prompt: {len(ids):,} tokens (with the start-of-document token) {what} the model's context "
                           f"of {context:,} (model.max_seq_len), leaving no room for a new token; shorten it")
    if len(ids) + args.max_new_tokens > context:
        print(f"note: --max-new-tokens {args.max_new_tokens} cut to {context - len(ids)}: the prompt's {len(ids)} tokens "
              f"leave that much room in the model's context of {context}", file=sys.stderr)
    prompt = torch.tensor([ids] * args.num_samples, device=device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    new = generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                   stop_token=tokenizer.eod_id, generator=generator)
    for row in new.tolist():
        if tokenizer.eod_id in row:
            row = row[: row.index(tokenizer.eod_id)]
        print(f"--- sample ({tag}) ---")
        print(args.prompt + tokenizer.decode(row))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
