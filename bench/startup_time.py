"""How long `lmforge train` takes to say something and to finish its first step, from a fresh process.

    python -m bench.startup_time --config gpt2-124m --set data.path=[data/stdlib] --set train.max_steps=20

Starts the real command (`python -m lmforge.cli train`, i.e. `lmforge train`) with run.log_interval=1
in a temporary run directory, stamps each line it prints with the seconds since the start, and
reports: first line printed, first step finished (its metrics.jsonl line), the whole run, and
the median tokens/s of the steps after the tenth. Prints one table.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="gpt2-124m")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as run_dir:
        cmd = [sys.executable, "-m", "lmforge.cli", "train", "--config", args.config, "--set", f"run.dir={run_dir}",
               "--set", "run.log_interval=1", "--set", "run.progress_bar=false", "--set", "run.tensorboard=false"]
        for item in args.set:
            cmd += ["--set", item]
        metrics = Path(run_dir) / "metrics.jsonl"
        start = time.perf_counter()
        first_step: list[float] = []

        def watch() -> None:
            while proc.poll() is None and not first_step:
                if metrics.is_file() and metrics.stat().st_size:
                    first_step.append(time.perf_counter() - start)
                time.sleep(0.05)

        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=watch, daemon=True).start()
        first_line = None
        for line in proc.stdout:
            elapsed = time.perf_counter() - start
            first_line = first_line if first_line is not None else elapsed
            print(f"[{elapsed:7.2f} s] {line.rstrip()}", flush=True)
        proc.wait()
        total = time.perf_counter() - start
        lines = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.is_file() else []
    rates = sorted(r["tokens_per_second"] for r in lines if "tokens_per_second" in r and r["step"] > 10)
    print(f"{'command':<40} {'first line s':>12} {'first step s':>12} {'total s':>8} {'tok/s (median, step>10)':>24}")
    print(f"{'lmforge train --config ' + args.config:<40} {first_line or float('nan'):>12.1f} "
          f"{(first_step or [float('nan')])[0]:>12.1f} {total:>8.1f} {rates[len(rates) // 2] if rates else float('nan'):>24.0f}")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
