"""`lmforge eval --checkpoint RUN_DIR [--data SHARD_DIR] [--split valid]`: loss, perplexity, bits per byte.

The split's token stream (documents joined with their EOD tokens, as training reads it) is cut into
consecutive windows of seq_len + 1 tokens overlapping by one, so every token but the first is
predicted exactly once, with the context its window gives it; a shorter last window takes the
tail. Window batches are dealt round-robin over ranks (`torchrun -m run_tools.evaluate ...` or
`torchrun --no-python lmforge eval ...`), and summed nats and token counts are all-reduced.

loss is nats per predicted token with the training loss's definition (softmax over the padded
vocab); perplexity = exp(loss); bits per byte = loss / ln 2 * (split tokens / split UTF-8 bytes),
both from the manifest, so it compares across tokenizers. The table is printed; `--output FILE`
also writes it as JSON. Nothing is written into the run directory (an archived, read-only run
evaluates as any other).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from lmforge.errors import LmforgeError, run_cli

IGNORE = -100


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lmforge eval", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, metavar="RUN_DIR", help="run directory to evaluate")
    parser.add_argument("--step", type=int, default=None, help="evaluate this step's checkpoint (default: latest)")
    parser.add_argument("--data", type=Path, default=None, metavar="SHARD_DIR",
                        help="shard directory (default: the run's first data.path; needed for a post-training run)")
    parser.add_argument("--split", choices=("valid", "train"), default="valid", help="which split (default: valid)")
    parser.add_argument("--batches", type=int, default=None, help="at most this many batches per rank (default: the whole split)")
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per batch (default: train.micro_batch_size)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens of context per window (default: train.seq_len)")
    parser.add_argument("--output", type=Path, default=None, metavar="FILE",
                        help="also write the result as JSON to FILE (default: print only; the run dir is never written)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


@dataclass(frozen=True)
class EvalResult:
    """What --output FILE holds."""

    run_dir: str
    checkpoint: str
    data: str
    split: str
    seq_len: int
    world_size: int
    sequences: int
    tokens: int
    """Predicted tokens evaluated (targets)."""
    split_tokens: int
    split_bytes: int
    loss: float
    """Mean nats per predicted token."""
    perplexity: float
    bits_per_byte: float


class SplitWindows:
    """Window w of a split: tokens [w * seq_len, w * seq_len + seq_len + 1), the last one possibly shorter."""

    def __init__(self, shard_dir: Path, split: str, seq_len: int):
        from data_prep.packed_dataset import PackedDataset

        self.data = PackedDataset(shard_dir, split, seq_len, seed=0)
        self.seq_len = seq_len
        self.count = math.ceil((self.data.num_tokens - 1) / seq_len)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, w: int) -> np.ndarray:
        start = w * self.seq_len
        return self.data.tokens(start, min(start + self.seq_len + 1, self.data.num_tokens))


def rank_batches(windows: int, batch_size: int, rank: int, world_size: int, max_batches: int | None) -> Iterator[range]:
    """This rank's batches of window indices: batch b of rank r is [(b * R + r) * B, ... + B) within range(windows)."""
    b = 0
    while (max_batches is None or b < max_batches) and b * world_size * batch_size < windows:
        start = (b * world_size + rank) * batch_size
        if start < windows:
            yield range(start, min(start + batch_size, windows))
        b += 1


def batch_tensors(rows: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """inputs and targets [B, T]; short rows are padded (inputs with 0, targets with IGNORE)."""
    width = max(len(r) for r in rows) - 1
    inputs = torch.zeros(len(rows), width, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, row in enumerate(rows):
        t = torch.from_numpy(row.astype(np.int64))
        inputs[i, : len(t) - 1] = t[:-1]
        targets[i, : len(t) - 1] = t[1:]
    return inputs, targets


@torch.no_grad()
def summed_loss(model, windows: SplitWindows, batches: Iterator[range], device: torch.device) -> tuple[float, int, int]:
    """(sum of nats, predicted tokens, sequences) over this rank's batches; loss over the padded vocab as in training."""
    from pretrain.model import token_cross_entropy

    nats, tokens, sequences = 0.0, 0, 0
    for batch in batches:
        inputs, targets = batch_tensors([windows[w] for w in batch])
        inputs, targets = inputs.to(device), targets.to(device)
        per_token = token_cross_entropy(model.lm_head(model.hidden_states(inputs)), targets, IGNORE)
        nats += float(per_token.double().sum())
        tokens += int((targets != IGNORE).sum())
        sequences += len(batch)
    return nats, tokens, sequences


def default_shard_dir(run_dir: Path, run_config) -> Path:
    """The run's first training shard directory; a post-training run (trained on JSONL) has none."""
    from run_tools.run_config import training_shards

    shards = training_shards(run_config)
    if not shards:
        raise LmforgeError(f"{run_dir}: a post-training run (it trained on JSONL, not shards); "
                           "pass --data SHARD_DIR, shards made with its tokenizer")
    return shards[0]


def _check_data(run_dir: Path, model, manifest, shard_dir: Path) -> None:
    if manifest.tokenizer.vocab_size != model.vocab_size:
        raise LmforgeError(
            f"{shard_dir}: made with a {manifest.tokenizer.vocab_size}-token tokenizer, but the run's model has "
            f"model.vocab_size = {model.vocab_size}; evaluate on shards made with the run's tokenizer"
        )
    from data_prep.tokenizer import Tokenizer
    from pretrain.run_dir import run_tokenizer_path

    try:
        path = run_tokenizer_path(run_dir)
        trained_with = Tokenizer.load(path).fingerprint
    except LmforgeError:
        return  # the run's tokenizer is elsewhere: the vocab check above is what we can do
    if trained_with != manifest.tokenizer.fingerprint:
        raise LmforgeError(
            f"{shard_dir}: made with tokenizer {manifest.tokenizer.fingerprint[:12]}..., but the run's tokenizer "
            f"{path} is {trained_with[:12]}...; evaluate on shards of the run's tokenizer"
        )


def nearest_dir_writable(path: Path) -> bool:
    import os

    folder = next((p for p in Path(path).absolute().parents if p.exists()), Path.cwd())
    return folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)


def print_table(result: EvalResult) -> None:
    rows = [
        ("checkpoint", result.checkpoint),
        ("data", f"{result.data} ({result.split})"),
        ("ranks", str(result.world_size)),
        ("sequences", f"{result.sequences:,} of up to {result.seq_len + 1} tokens"),
        ("tokens", f"{result.tokens:,} predicted of {result.split_tokens:,} in the split"),
        ("loss", f"{result.loss:.4f} nats/token"),
        ("perplexity", f"{result.perplexity:.3f}"),
        ("bits per byte", f"{result.bits_per_byte:.4f} ({result.split_tokens / result.split_bytes:.4f} tokens/byte)"),
    ]
    width = max(len(name) for name, _ in rows)
    print("\n".join(f"{name:<{width}}  {value}" for name, value in rows), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    from data_prep.manifest import load_manifest
    from lmforge import distributed
    from lmforge.files import write_atomic
    from run_tools.run_config import load_checked_model, load_run_config

    args = parse_args(argv)
    run_config = load_run_config(args.checkpoint)
    shard_dir = args.data if args.data is not None else default_shard_dir(args.checkpoint, run_config)
    seq_len = run_config.train.seq_len if args.seq_len is None else args.seq_len  # 0 is refused below, not the default
    batch_size = run_config.train.micro_batch_size if args.batch_size is None else args.batch_size
    for name, value in (("--seq-len", seq_len), ("--batch-size", batch_size), ("--batches", args.batches)):
        if value is not None and value < 1:
            raise LmforgeError(f"{name} {value}: must be at least 1")
    if args.output is not None and (args.output.is_dir() or not nearest_dir_writable(args.output)):
        raise LmforgeError(f"--output {args.output}: {'a directory' if args.output.is_dir() else 'not writable'}; "
                           "expected a file path in a writable folder")
    if seq_len > run_config.model.max_seq_len:
        raise LmforgeError(f"--seq-len {seq_len}: longer than the model's max_seq_len = {run_config.model.max_seq_len}")
    manifest = load_manifest(shard_dir)
    _check_data(args.checkpoint, run_config.model, manifest, shard_dir)
    windows = SplitWindows(shard_dir, args.split, seq_len)
    model, _, tag = load_checked_model(args.checkpoint, args.step)  # every check is done before any process group

    info = distributed.init_distributed("eval")
    try:
        model = model.to(info.device)
        batches = rank_batches(len(windows), batch_size, info.rank, info.world_size, args.batches)
        local = torch.tensor(summed_loss(model, windows, batches, info.device), dtype=torch.float64, device=info.device)
        nats, tokens, sequences = (distributed.all_reduce_mean(local) * info.world_size).tolist()
        split_tokens, split_bytes = manifest.tokens(args.split), manifest.bytes(args.split)
        loss = nats / tokens
        result = EvalResult(
            run_dir=str(args.checkpoint), checkpoint=tag, data=str(shard_dir), split=args.split, seq_len=seq_len,
            world_size=info.world_size, sequences=round(sequences), tokens=round(tokens), split_tokens=split_tokens,
            split_bytes=split_bytes, loss=loss, perplexity=math.exp(min(loss, 700.0)),
            bits_per_byte=loss / math.log(2) * split_tokens / max(split_bytes, 1),
        )
        if distributed.is_main():
            print_table(result)
            if args.output is not None:
                args.output.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(args.output, (json.dumps(asdict(result), indent=2) + "\n").encode())
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
