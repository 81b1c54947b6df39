"""lmforge's training against the plain PyTorch reference (bench/reference_loop.py), step by step.

    python -m bench.loss_parity --config tiny --stages 0 1 2 3 --nproc 2 --out runs/parity \
        --set train.max_steps=50

For each ZeRO stage it trains with `lmforge train` (torchrun when --nproc > 1, the stage's
ds_configs/zeroN.json, run.log_interval=1 so metrics.jsonl has every step's loss and grad_norm),
runs the reference loop once on the same config (the same data-parallel size, so the same global
batch), and prints the largest relative difference of the loss and the gradient norm over the
steps, and both final valid losses. `--seeds` adds reference runs with other train.seed values:
their difference to the first is the run-to-run noise to judge a bf16 GPU comparison by.
Writes OUT/parity.json with every number printed. ZeRO-0 always runs on one rank.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parent.parent
LOGGED_EVERY_STEP = ["run.log_interval=1", "run.progress_bar=false", "run.tensorboard=false"]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def step_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-step lines (those with a loss) of a metrics.jsonl or a reference output."""
    return [r for r in records if "loss" in r]


def final_val_loss(records: list[dict[str, Any]]) -> float | None:
    values = [r["val_loss"] for r in records if r.get("val_loss") is not None]
    return values[-1] if values else None


def tail_loss(steps: list[dict[str, Any]]) -> float:
    """Mean loss over the last tenth of the steps (at least one): a curve's end, less noisy than a step."""
    tail = steps[-max(1, len(steps) // 10):]
    return sum(r["loss"] for r in tail) / len(tail)


def relative_difference(value: float | None, reference: float) -> float:
    if value is None:
        return float("inf")  # not reported: cannot be equal
    return abs(value - reference) / max(abs(reference), 1e-30)


def max_relative_differences(lmforge: list[dict[str, Any]], reference: list[dict[str, Any]]) -> dict[str, float]:
    """{"loss": max over steps, "grad_norm": max over steps} of |lmforge - reference| / |reference|."""
    if [r["step"] for r in lmforge] != [r["step"] for r in reference]:
        raise ValueError(f"steps differ: lmforge {len(lmforge)} lines, reference {len(reference)}")
    return {key: max(relative_difference(a[key], b[key]) for a, b in zip(lmforge, reference)) for key in ("loss", "grad_norm")}


def training_command(nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "pretrain.train"]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(_free_port()),
            "-m", "pretrain.train"]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _with_set(sets: Sequence[str]) -> list[str]:
    return [arg for value in sets for arg in ("--set", value)]


def run_lmforge(config: str, sets: Sequence[str], run_dir: Path, nproc: int, timeout: int = 1800) -> list[dict[str, Any]]:
    """Trains with lmforge's entry point; returns its metrics.jsonl records."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = training_command(nproc) + ["--config", config] + _with_set([*sets, *LOGGED_EVERY_STEP, f"run.dir={run_dir}"])
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"lmforge train failed ({done.returncode}): {' '.join(cmd)}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    return read_jsonl(run_dir / "metrics.jsonl")


def run_reference(config: str, sets: Sequence[str], ranks: int) -> list[dict[str, Any]]:
    """The reference loop in this process (GPU when there is one)."""
    import torch

    from bench.reference_loop import train_reference
    from pretrain.config import load_pretrain_config

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return list(train_reference(load_pretrain_config(config, list(sets)), ranks, device))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny", help="preset name in configs/ or a YAML path")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value (both runs)")
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3], help="ZeRO stages to train lmforge with")
    parser.add_argument("--nproc", type=int, default=1, help="ranks for ZeRO 1-3 (ZeRO-0 runs on one)")
    parser.add_argument("--seeds", type=int, nargs="*", default=[], help="extra reference seeds (run-to-run noise)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the lmforge run directories and parity.json")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    results: dict[str, Any] = {"config": args.config, "set": args.set, "stages": {}}
    references: dict[int, list[dict[str, Any]]] = {}
    for stage in args.stages:
        nproc = 1 if stage == 0 else args.nproc
        sets = [*args.set, f"deepspeed.config=ds_configs/zero{stage}.json"]
        lmforge = run_lmforge(args.config, sets, args.out / f"zero{stage}", nproc)
        if nproc not in references:
            references[nproc] = run_reference(args.config, sets, nproc)
        reference = references[nproc]
        diffs = max_relative_differences(step_records(lmforge), step_records(reference))
        tails = tail_loss(step_records(lmforge)), tail_loss(step_records(reference))
        results["stages"][stage] = {"ranks": nproc, **{f"max_rel_{k}": v for k, v in diffs.items()},
                                    "tail_loss": tails[0], "reference_tail_loss": tails[1],
                                    "val_loss": final_val_loss(lmforge), "reference_val_loss": final_val_loss(reference)}
        print(f"ZeRO-{stage} ({nproc} rank(s)): max relative difference loss {diffs['loss']:.2e}, "
              f"grad_norm {diffs['grad_norm']:.2e}; last-tenth loss lmforge {tails[0]:.4f}, reference {tails[1]:.4f}; "
              f"final val_loss lmforge {final_val_loss(lmforge)}, reference {final_val_loss(reference)}", flush=True)
    for seed in args.seeds:
        first = next(iter(references.values()))
        other = run_reference(args.config, [*args.set, f"train.seed={seed}"], next(iter(references)))
        noise = max_relative_differences(step_records(other), step_records(first))
        results.setdefault("seed_noise", {})[seed] = {**{f"max_rel_{k}": v for k, v in noise.items()},
                                                      "tail_loss": tail_loss(step_records(other)), "val_loss": final_val_loss(other)}
        print(f"reference seed {seed}: max relative difference to the first seed: loss {noise['loss']:.2e}; "
              f"last-tenth loss {tail_loss(step_records(other)):.4f}; final val_loss {final_val_loss(other)}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "parity.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
