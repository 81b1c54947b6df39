"""What `lmforge train` computes, as a plain PyTorch loop with no DeepSpeed (docs/parity.md).

    python -m bench.reference_loop --config tiny --set train.max_steps=50 --ranks 2 --output ref.jsonl

Same initial weights (train.seed, then the model built as pretrain.train's Trainer builds it), the
same batches (the global order of pretrain/rank_batches.py: sample `s * global_batch + k` is the
k-th of step s, global_batch = micro_batch_size x grad_accum_steps x --ranks), torch.optim.AdamW
with lmforge's decay groups, its schedule and gradient clipping. One process holds the whole
global batch; a micro-batch is the `--ranks` ranks' micro-batches together, so its mean loss is
the mean of theirs. On a GPU it runs in bf16 autocast over fp32 weights (the shipped JSONs'
torch_autocast); on CPU in fp32. Writes one JSON line per step: step, loss, grad_norm, lr (the lr
that step updated with); and one with the final val_loss.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from data_prep.manifest import load_manifest
from data_prep.packed_dataset import build_dataset
from lmforge.errors import LmforgeError, run_cli
from pretrain.config import PretrainConfig, TrainConfig, load_pretrain_config, resolve_repo_path
from pretrain.model import Transformer


def learning_rate(step: int, train: TrainConfig) -> float:
    """The lr optimizer step `step` (1 = the first) updates with: lmforge's schedule, docs/parity.md."""
    w, t, peak, floor = train.warmup_steps, train.max_steps, train.lr, train.min_lr
    if step == 1:
        return 0.0  # DeepSpeed's WarmupCosineLR starts after one step
    if w >= 3:
        if step <= w:
            return peak * (step - 1) / w
        progress = (step - w) / (t - w)
    else:  # DeepSpeed's warmup lasts at least two steps
        if step <= 3:
            return peak * (1.0 if w < 2 else step / 4)
        progress = (step - 3) / (t - 3)
    return floor + (peak - floor) * (1 + math.cos(math.pi * min(1.0, progress))) / 2


def parameter_groups(model: torch.nn.Module, train: TrainConfig) -> list[dict[str, Any]]:
    """Weight decay on 2-D weights; never on norms and biases; on embeddings only with train.decay_embeddings."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay = [p for p in model.parameters() if p.dim() >= 2 and (train.decay_embeddings or id(p) not in embeddings)]
    chosen = {id(p) for p in decay}
    rest = [p for p in model.parameters() if id(p) not in chosen]
    return [{"params": decay, "weight_decay": train.weight_decay}, {"params": rest, "weight_decay": 0.0}]


def _rows(dataset, first: int, count: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    batch = torch.from_numpy(np.stack([dataset.sample(first + k) for k in range(count)]).astype(np.int64)).to(device)
    return batch[:, :-1], batch[:, 1:]


def train_reference(config: PretrainConfig, ranks: int, device: torch.device) -> Iterator[dict[str, Any]]:
    """Trains config's model for train.max_steps; yields one record per step, then {"val_loss": ...}."""
    train = config.train
    model_config = config.model.with_vocab(load_manifest(resolve_repo_path(config.data.path[0])).tokenizer.vocab_size)
    torch.manual_seed(train.seed)
    # Drawn where pretrain.engine.build_model draws it below ZeRO-3 (on the GPU): the same initial weights.
    with torch.device(device) if device.type == "cuda" else nullcontext():
        model = Transformer(model_config)
    optimizer = torch.optim.AdamW(parameter_groups(model, train), lr=train.lr, betas=(train.beta1, train.beta2),
                                  eps=train.adam_eps, weight_decay=train.weight_decay)
    paths = [resolve_repo_path(p) for p in config.data.path]
    data = build_dataset(paths, config.data.weights, "train", train.seq_len, train.seed)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    rows = train.micro_batch_size * ranks  # one micro-batch of every rank
    global_batch = rows * train.grad_accum_steps
    for step in range(1, train.max_steps + 1):
        total = 0.0
        for micro in range(train.grad_accum_steps):
            inputs, targets = _rows(data, (step - 1) * global_batch + micro * rows, rows, device)
            with autocast:
                loss = model(inputs, targets)
            (loss / train.grad_accum_steps).backward()
            total += loss.item()
        max_norm = train.grad_clip if train.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        lr = learning_rate(step, train)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        yield {"step": step, "loss": total / train.grad_accum_steps, "grad_norm": float(grad_norm), "lr": lr}
    yield {"step": train.max_steps, "val_loss": validation_loss(model, config, ranks, device, autocast)}


@torch.no_grad()
def validation_loss(model, config: PretrainConfig, ranks: int, device: torch.device, autocast) -> float | None:
    """Mean loss over train.eval_batches batches of the valid split, as lmforge's evaluation reads them."""
    train = config.train
    try:
        valid = build_dataset([resolve_repo_path(p) for p in config.data.path], config.data.weights, "valid",
                              train.seq_len, train.seed)
    except LmforgeError:  # no valid split: lmforge skips evaluation too
        return None
    rows, losses = train.micro_batch_size * ranks, []
    for index in range(train.eval_batches):
        inputs, targets = _rows(valid, index * rows, rows, device)
        with autocast:
            losses.append(model(inputs, targets).item())
    return sum(losses) / len(losses)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny", help="preset name in configs/ or a YAML path (as lmforge train)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    parser.add_argument("--ranks", type=int, default=1, help="data-parallel ranks of the lmforge run to match")
    parser.add_argument("--output", type=Path, required=True, help="JSON lines: one per step, then val_loss")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    config = load_pretrain_config(args.config, args.set)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as out:
        for record in train_reference(config, args.ranks, device):
            out.write(json.dumps(record) + "\n")
            out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
