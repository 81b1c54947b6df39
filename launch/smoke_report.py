"""The end of launch/smoke.sh: tokens/s, MFU, memory and a sample of its run; exit 1 unless the loss fell.

    python -m launch.smoke_report --config tiny --set run.dir=runs/smoke   (the run's own arguments)

Reads RUN_DIR/metrics.jsonl: the loss must fall from the first logged step to the last; speed is the
median over the logged intervals after the first (which holds start-up and compilation).
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
from pathlib import Path
from typing import Any, Sequence

from lmforge.errors import LmforgeError, run_cli
from lmforge.run_layout import metrics_path

SMOKE_FAILED_EXIT_CODE = 1


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The training lines (those with a loss) of RUN_DIR/metrics.jsonl, in order."""
    path = metrics_path(run_dir)
    if not path.is_file():
        raise LmforgeError(f"{path}: not found; did the smoke run train?")
    from pretrain.metrics import parse_lines  # a torn last line (a killed run) is skipped

    records = parse_lines(path.read_bytes())[0]
    return [r for r in records if r.get("loss") is not None]


def summary_lines(records: list[dict[str, Any]]) -> list[str]:
    steady = records[1:] or records
    tokens_per_second = statistics.median(r["tokens_per_second"] for r in steady)
    mfus = [r["mfu"] for r in steady if r.get("mfu") is not None]
    mfu = f"{100 * statistics.median(mfus):.1f}%" if mfus else "n/a (no peak flops known for this device)"
    memory = max(r.get("memory_gb") or 0.0 for r in records)
    first, last = records[0], records[-1]
    return [
        f"loss         {first['loss']:.4f} at step {first['step']} -> {last['loss']:.4f} at step {last['step']}",
        f"tokens/s     {tokens_per_second:,.0f} (median of {len(steady)} logged intervals)",
        f"MFU          {mfu}",
        f"memory       {memory:.2f} GB peak per rank",
    ]


def loss_fell(records: list[dict[str, Any]]) -> bool:
    return len(records) >= 2 and records[-1]["loss"] < records[0]["loss"]


def print_sample(run_dir: Path) -> None:
    if importlib.util.find_spec("run_tools.generate") is None:
        print("sample       skipped: `lmforge generate` is not in this checkout")
        return
    from run_tools.generate import main as generate

    print("sample:", flush=True)
    generate(["--checkpoint", str(run_dir), "--max-new-tokens", "64", "--seed", "0"])


def main(argv: Sequence[str] | None = None) -> int:
    from pretrain.config import load_pretrain_config

    parser = argparse.ArgumentParser(prog="python -m launch.smoke_report", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--no-sample", action="store_true", help="skip the sample")
    args = parser.parse_args(argv)
    run_dir = load_pretrain_config(args.config, args.set).run.dir
    records = read_metrics(run_dir)
    if not records:
        raise LmforgeError(f"{run_dir / 'metrics.jsonl'}: no training lines")
    print(f"smoke run {run_dir}:")
    for line in summary_lines(records):
        print(f"  {line}")
    if not loss_fell(records):
        print(f"error: the loss did not fall ({records[0]['loss']:.4f} at step {records[0]['step']} -> "
              f"{records[-1]['loss']:.4f} at step {records[-1]['step']}): this machine does not train correctly",
              file=sys.stderr)
        return SMOKE_FAILED_EXIT_CODE
    if not args.no_sample:
        print_sample(run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
