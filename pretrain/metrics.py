"""Training metrics: RUN_DIR/metrics.jsonl (one JSON object per logged step) and TensorBoard."""
from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import LmforgeError
from lmforge.files import write_atomic
from lmforge.run_layout import TENSORBOARD_DIR, metrics_path

# Dense bf16 peak of the chips we run on, by the vendor's datasheet (flop/s).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for chip, flops in PEAK_BF16_FLOPS.items() if chip in name), None)


def memory_gb(device: torch.device) -> float:
    """Peak memory of this rank: the GPU's allocator peak, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib * (1 if sys.platform != "darwin" else 1 / 1024) / 1e6


def model_flops_utilisation(tokens_per_second: float, flops_per_token: float, device: torch.device, ranks: int) -> float | None:
    peak = peak_flops(device)
    return None if peak is None else tokens_per_second * flops_per_token / (peak * ranks)


def router_load_metrics(blocks) -> dict[str, float]:
    """Load balance of the MoE blocks' last forward (this rank's last micro-batch): the mean
    load-balancing loss (experts_per_token when balanced) and, per block and worst of all, the
    busiest expert's tokens over the mean (1 when balanced). Empty for a dense model."""
    loads = [block.mlp.expert_load for block in blocks if getattr(block.mlp, "expert_load", None) is not None]
    if not loads:
        return {}
    ratios = (torch.stack(loads) / torch.stack(loads).mean(-1, keepdim=True).clamp(min=1e-9)).amax(-1).tolist()
    aux = torch.stack([block.mlp.aux_loss.detach().float() for block in blocks if getattr(block.mlp, "aux_loss", None) is not None])
    record = {"router_aux_loss": float(aux.mean()), "expert_load_max_over_mean": max(ratios)}
    record.update({f"expert_load_max_over_mean_layer{i}": ratio for i, ratio in enumerate(ratios)})
    return record


class MetricsWriter:
    """Appends metric lines on the main rank; a resumed run first drops lines past its checkpoint."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, resume_step: int):
        self.enabled = enabled
        self.path = metrics_path(run_dir)
        self.tb = None
        if not enabled:
            return
        self._truncate_after(resume_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(Path(run_dir) / TENSORBOARD_DIR), purge_step=resume_step + 1 if resume_step else None)

    def _truncate_after(self, step: int) -> None:
        """Keeps the lines up to `step` (atomically); a torn line (a kill or a full disk mid-write) is
        dropped with a note."""
        if not self.path.is_file():
            return
        records, torn = parse_lines(self.path.read_bytes())
        if torn:
            print(f"note: {self.path}: dropped {len(torn)} torn line(s) (line {', '.join(map(str, torn))}: "
                  "not complete JSON, as a kill or a full disk leaves it)", flush=True)
        if step == 0 and records:  # no checkpoint to resume from: an earlier attempt's metrics are kept aside, not lost
            aside = self.path.with_name(f"metrics.{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.jsonl")
            os.replace(self.path, aside)
            print(f"note: {self.path}: no checkpoint to resume from, so training starts at step 0; the earlier "
                  f"metrics (to step {records[-1]['step']}) are kept as {aside}", flush=True)
            return
        kept = [json.dumps(r) for r in records if r["step"] <= step]
        write_atomic(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        """Appends one line; a NaN or infinite value is written as null (strict JSON)."""
        if not self.enabled:
            return
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        try:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
        except OSError as err:
            raise LmforgeError(f"{self.path}: cannot append a metrics line ({err.strerror or err}); free space "
                               "under run.dir and rerun the same command to resume") from None
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self.tb.add_scalar(f"train/{key}" if not key.startswith("val_") else f"eval/{key}", value, record["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def parse_lines(data: bytes) -> tuple[list[dict[str, Any]], list[int]]:
    """The complete records of an append-only JSONL file and the numbers (from 1) of torn lines
    skipped (not UTF-8, or not a JSON object with an integer `step`)."""
    records, torn = [], []
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except ValueError:
            torn.append(number)
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            torn.append(number)
            continue
        records.append(record)
    return records, torn


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """RUN_DIR/metrics.jsonl's records; a torn line is skipped (parse_lines)."""
    path = metrics_path(run_dir)
    return parse_lines(path.read_bytes())[0] if path.is_file() else []
