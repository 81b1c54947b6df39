"""`lmforge plot RUN_DIR`: training and validation loss against tokens, as RUN_DIR/loss.png.

Torn lines of metrics.jsonl are skipped (pretrain.metrics.read_metrics); a loss.png in a folder that is
not an lmforge run is never replaced."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from lmforge import ownership
from lmforge.errors import LmforgeError, run_cli
from lmforge.files import write_atomic
from lmforge.run_layout import LOSS_PLOT, metrics_path
from pretrain.metrics import read_metrics


def plot_losses(run_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    valid = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train:
        raise LmforgeError(f"{metrics_path(run_dir)}: no training metrics to plot")
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="train loss")
    if valid:
        ax.plot(*zip(*valid), "o-", label="valid loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    out = run_dir / LOSS_PLOT
    if out.exists() and ownership.kind_of(run_dir)[0] not in ("run", "posttrain-run"):
        raise LmforgeError(f"{out}: exists and {run_dir} is not an lmforge run directory; nothing was changed: "
                           "move the file away to plot here")
    write_atomic(out, lambda temp: fig.savefig(temp, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmforge plot", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    print(plot_losses(args.run_dir))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
