"""How long `lmforge train` takes to say something and to finish its first step, from a fresh process.

    python -m bench.startup_time --config gpt2-124m --set data.path=[data/stdlib] --set train.max_steps=20 \
        --raw --fresh-caches

Starts the real command (`python -m lmforge.cli train`, i.e. `lmforge train`) with run.log_interval=1
in a temporary run directory, stamps each line it prints with the seconds since the start, and
reports: first line printed, first step finished (its metrics.jsonl line), the whole run, and
the median tokens/s of the steps after the tenth. `--raw` first runs a plain PyTorch script on the
same config and shards in a process of its own (`bench.raw_train`: its first step is its first `step 1`
line) and gives each row's first step as a multiple of the script's. `--fresh-caches` gives each row
empty inductor and Triton caches of its own (what a fresh machine has; torch's default caches are shared
by every process of a user). Prints one table.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NAN = float("nan")


@dataclass
class Timing:
    command: str
    first_line: float = NAN
    first_step: float = NAN
    total: float = NAN
    tokens_per_second: float = NAN
    returncode: int = 0


def timed_run(command: str, cmd: list[str], env: dict[str, str], metrics: Path | None) -> Timing:
    """Runs `cmd`, printing its lines stamped with the seconds since its start. The first step is the
    first line of `metrics` (lmforge's metrics.jsonl) or, without one, the first `step 1 ` line."""
    timing, first_step = Timing(command), []
    start = time.perf_counter()

    def watch() -> None:
        while proc.poll() is None and not first_step:
            if metrics.is_file() and metrics.stat().st_size:
                first_step.append(time.perf_counter() - start)
            time.sleep(0.05)

    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if metrics is not None:
        threading.Thread(target=watch, daemon=True).start()
    for line in proc.stdout:
        elapsed = time.perf_counter() - start
        if math.isnan(timing.first_line):
            timing.first_line = elapsed
        if metrics is None and not first_step and line.startswith("step 1 "):
            first_step.append(elapsed)
        print(f"[{elapsed:7.2f} s] {line.rstrip()}", flush=True)
    timing.returncode = proc.wait()
    timing.total = time.perf_counter() - start
    timing.first_step = first_step[0] if first_step else NAN
    if metrics is not None and metrics.is_file():
        lines = [json.loads(x) for x in metrics.read_text().splitlines()]
        rates = sorted(r["tokens_per_second"] for r in lines if "tokens_per_second" in r and r["step"] > 10)
        timing.tokens_per_second = rates[len(rates) // 2] if rates else NAN
    return timing


def row_env(scratch: Path, fresh_caches: bool) -> dict[str, str]:
    env = dict(os.environ)
    if fresh_caches:
        for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
            env[name] = str(scratch / name.lower())
    return env


def print_table(rows: list[Timing], reference: Timing | None) -> None:
    print(f"{'command':<40} {'first line s':>12} {'first step s':>12} {'total s':>8} {'tok/s (median, step>10)':>24}"
          + (f" {'first step × raw':>16}" if reference else ""))
    for row in rows:
        line = (f"{row.command:<40} {row.first_line:>12.1f} {row.first_step:>12.1f} {row.total:>8.1f} "
                f"{row.tokens_per_second:>24.0f}")
        if reference:
            line += f" {row.first_step / reference.first_step:>16.2f}"
        print(line + ("" if row.returncode == 0 else f"  (exit {row.returncode})"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="gpt2-124m")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--raw", action="store_true", help="first time a plain PyTorch script (bench.raw_train)")
    parser.add_argument("--fresh-caches", action="store_true", help="each row with empty inductor and Triton caches")
    args = parser.parse_args(argv)
    sets = [arg for item in args.set for arg in ("--set", item)]
    rows: list[Timing] = []
    if args.raw:
        with tempfile.TemporaryDirectory() as scratch:
            cmd = [sys.executable, "-m", "bench.raw_train", "--config", args.config, *sets]
            rows.append(timed_run("raw PyTorch (bench.raw_train)", cmd, row_env(Path(scratch), args.fresh_caches), None))
    with tempfile.TemporaryDirectory() as scratch:
        run_dir = Path(scratch) / "run"
        cmd = [sys.executable, "-m", "lmforge.cli", "train", "--config", args.config, "--set", f"run.dir={run_dir}",
               "--set", "run.log_interval=1", "--set", "run.progress_bar=false", "--set", "run.tensorboard=false", *sets]
        rows.append(timed_run(f"lmforge train --config {args.config}", cmd, row_env(Path(scratch), args.fresh_caches),
                              run_dir / "metrics.jsonl"))
    reference = rows[0] if args.raw and rows[0].returncode == 0 else None
    print_table(rows, reference)
    return max(row.returncode for row in rows)


if __name__ == "__main__":
    sys.exit(main())
