"""`lmforge prep tokenizer|shards|verify`: text to a tokenizer, shards, and their check."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from lmforge.errors import LmforgeError, run_cli


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one-line LmforgeErrors (exit 2, no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise LmforgeError(f"{self.prog}: {message}; see {self.prog} --help")


def _add_corpus_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", nargs="+", action="extend", metavar="PATH",
                        help="files, directories (recursive) or 'stdlib' (default: stdlib); "
                             ".jsonl, .jsonl.gz, .jsonl.zst and .parquet are read as records, any other file is one document")
    parser.add_argument("--include", action="append", default=[], metavar="GLOB",
                        help="only files in directories whose name or relative path matches, e.g. '*.py' (repeatable)")
    parser.add_argument("--text-field", default="text", help="record field holding the text (default: text)")
    parser.add_argument("--skip-bad-documents", action="store_true",
                        help="skip and count undecodable or malformed documents instead of stopping")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="show progress bars (default: when stderr is a terminal)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lmforge prep", description="Text to a sentencepiece tokenizer and Megatron-format shards.")
    verbs = parser.add_subparsers(dest="verb", metavar="tokenizer|shards|verify", parser_class=_Parser)

    tok = verbs.add_parser("tokenizer", help="train a BPE tokenizer: DIR/tokenizer.model and DIR/tokenizer.json")
    _add_corpus_arguments(tok)
    tok.add_argument("--output", required=True, type=Path, metavar="DIR")
    tok.add_argument("--vocab-size", type=int, default=32000, help="pieces in the vocabulary (default: 32000)")
    tok.add_argument("--user-symbol", action="append", default=[], metavar="TEXT",
                     help="a string always encoded as one token where it appears in text (repeatable)")
    tok.add_argument("--control-symbol", action="append", default=[], metavar="TEXT",
                     help="a token with an id that text never produces (repeatable)")
    tok.add_argument("--character-coverage", type=float, default=0.9995,
                     help="share of characters given their own piece; rarer ones use byte pieces (default: 0.9995)")
    tok.add_argument("--input-sentence-size", type=int, default=200_000,
                     help="sample at most this many training chunks (<= 64 KiB each) from the corpus; 0: all")
    tok.add_argument("--seed", type=int, default=0, help="seed of the trainer's sampling (default: 0)")

    shards = verbs.add_parser("shards", help="tokenize into train/valid Megatron .bin/.idx shards with DIR/manifest.json")
    _add_corpus_arguments(shards)
    shards.add_argument("--tokenizer", required=True, type=Path, metavar="MODEL",
                        help="tokenizer.model, or the directory holding it")
    shards.add_argument("--output", required=True, type=Path, metavar="DIR")
    shards.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes (default: all cores)")
    shards.add_argument("--valid-fraction", type=float, default=0.01, help="share of documents in valid (default: 0.01)")
    shards.add_argument("--seed", type=int, default=0, help="seed of the train/valid split hash (default: 0)")
    shards.add_argument("--shard-tokens", type=int, default=100_000_000,
                        help="close a shard once it holds this many tokens (default: 100,000,000)")

    verify = verbs.add_parser("verify", help="recompute the checksums of a shard directory")
    verify.add_argument("directory", type=Path, metavar="DIR")
    return parser


def _check_numbers(args: argparse.Namespace) -> None:
    """Collects every out-of-range number among the options this verb has; raises once."""
    checks = {
        "vocab_size": (lambda v: v >= 2, "an integer >= 2"),
        "valid_fraction": (lambda v: 0.0 <= v <= 1.0, "a number from 0 to 1"),
        "workers": (lambda v: v >= 1, "an integer >= 1"),
        "shard_tokens": (lambda v: v >= 1, "an integer >= 1"),
        "character_coverage": (lambda v: 0.0 < v <= 1.0, "a number in (0, 1]"),
        "input_sentence_size": (lambda v: v >= 0, "an integer >= 0"),
    }
    problems = [
        f"--{name.replace('_', '-')} {getattr(args, name)}: expected {allowed}"
        for name, (ok, allowed) in checks.items()
        if hasattr(args, name) and not ok(getattr(args, name))
    ]
    if problems:
        raise LmforgeError("; ".join(problems))


def _table(rows: Sequence[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v:>16}" for k, v in rows)


def _corpus_spec(args: argparse.Namespace):
    from data_prep.corpus import CorpusSpec

    return CorpusSpec(inputs=tuple(args.input or ["stdlib"]), include=tuple(args.include),
                      text_field=args.text_field, skip_bad_documents=args.skip_bad_documents)


def _progress(args: argparse.Namespace) -> bool:
    return sys.stderr.isatty() if args.progress is None else args.progress


def run_tokenizer(args: argparse.Namespace) -> int:
    import json

    from data_prep.tokenizer import METADATA_FILE, TokenizerOptions, tokenizer_is_current, train_tokenizer

    options = TokenizerOptions(
        vocab_size=args.vocab_size, user_symbols=tuple(args.user_symbol), control_symbols=tuple(args.control_symbol),
        character_coverage=args.character_coverage, input_sentence_size=args.input_sentence_size, seed=args.seed,
    )
    started = time.perf_counter()
    spec = _corpus_spec(args)
    current = tokenizer_is_current(spec, options, args.output)
    model = train_tokenizer(spec, options, args.output, progress=_progress(args))
    meta = json.loads((model.parent / METADATA_FILE).read_text(encoding="utf-8"))
    state = "up to date (same inputs and options), not retrained" if current else "written"
    print(f"{model} and {METADATA_FILE} {state}")
    print(_table([
        ("documents", f"{meta['corpus']['documents']:,}"),
        ("skipped documents", f"{meta['corpus']['skipped_documents']:,}"),
        ("text bytes", f"{meta['corpus']['bytes']:,}"),
        ("vocab size", f"{meta['vocab_size']:,}"),
        ("seconds", f"{time.perf_counter() - started:,.1f}"),
        ("fingerprint", meta["model_sha256"][:16]),
    ]))
    return 0


def run_shards(args: argparse.Namespace) -> int:
    from data_prep.shards import ShardOptions, build_shards

    options = ShardOptions(valid_fraction=args.valid_fraction, seed=args.seed, shard_tokens=args.shard_tokens,
                           workers=args.workers)
    summary = build_shards(_corpus_spec(args), args.tokenizer, args.output, options, progress=_progress(args))
    state = "up to date" if summary.reused_shards == summary.shards else "written"
    print(f"{summary.directory}/manifest.json {state}")
    print(_table([
        ("documents", f"{summary.documents:,}"),
        ("skipped documents", f"{summary.skipped_documents:,}"),
        ("tokens", f"{summary.tokens:,}"),
        ("shards", f"{summary.shards:,}"),
        ("reused shards", f"{summary.reused_shards:,}"),
        ("seconds", f"{summary.seconds:,.1f}"),
        ("tokens/s", f"{summary.tokens_per_second:,.0f}"),
        ("bytes per token", f"{summary.bytes_per_token:.3f}"),
    ]))
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from data_prep.manifest import verify_manifest

    manifest = verify_manifest(args.directory)
    counts = ", ".join(f"{split} {manifest.tokens(split):,} tokens" for split in ("train", "valid"))
    print(f"ok: {args.directory}: {len(manifest.shards)} shards ({counts}), every checksum matches")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return 2
    _check_numbers(args)
    return {"tokenizer": run_tokenizer, "shards": run_shards, "verify": run_verify}[args.verb](args)


if __name__ == "__main__":
    sys.exit(run_cli(main))
