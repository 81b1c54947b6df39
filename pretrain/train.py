"""Pretraining: `lmforge train --config tiny --set train.max_steps=100`.

Also runs as `python -m pretrain.train`, `torchrun ... -m pretrain.train`, `deepspeed
pretrain/train.py` and `mpirun ... python -m pretrain.train`. Reads top to bottom: arguments and
config checks (all before any process group exists), data, model, engine, resume, the loop.
Rerunning the same command with the same run.dir resumes from its latest checkpoint.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # `deepspeed pretrain/train.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from lmforge.config import save_config
from lmforge.errors import LmforgeError, run_cli
from pretrain import checkpoint, distributed, faults
from pretrain.config import PretrainConfig, load_pretrain_config, resolve_repo_path
from pretrain.data_source import TrainingData, check_data
from pretrain.ds_config import build_deepspeed_config, precision_of, zero_stage_of
from pretrain.metrics import MetricsWriter, memory_gb, model_flops_utilisation
from pretrain.model import Transformer


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lmforge train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny", help="preset name in configs/ or a YAML path (default: tiny)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return parser.parse_args(argv)


def launcher_world_size() -> int:
    for key in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS"):
        if os.environ.get(key):
            return int(os.environ[key])
    return 1


def bf16_supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


@dataclass(frozen=True)
class PreparedRun:
    """A config whose every input was checked, plus DeepSpeed's merged JSON."""

    config: PretrainConfig
    ds_config: dict[str, Any]


def prepare(config: PretrainConfig, world_size: int) -> PreparedRun:
    """Checks data, vocab, DeepSpeed JSON and run dir; resolves model.vocab_size from the data."""
    vocab_size = check_data(config.data)
    if config.model.vocab_size is not None and config.model.vocab_size != vocab_size:
        raise LmforgeError(
            f"model.vocab_size = {config.model.vocab_size} but the tokenizer of data.path has {vocab_size} tokens; "
            "set model.vocab_size to null to take the tokenizer's"
        )
    config = replace(config, model=config.model.with_vocab(vocab_size))
    ds_path = resolve_repo_path(config.deepspeed.config)
    ds_config = build_deepspeed_config(ds_path, config.train, world_size, bf16_supported())
    run_dir = config.run.dir
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write_probe{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise LmforgeError(f"run.dir = {run_dir}: not writable ({err.strerror})") from None
    return PreparedRun(config, ds_config)


class Trainer:
    def __init__(self, run: PreparedRun, info: distributed.DistributedInfo):
        from pretrain.engine import build_engine, data_parallel_position

        self.config, self.ds_config, self.info = run.config, run.ds_config, info
        train = self.config.train
        torch.manual_seed(train.seed)
        self.model = Transformer(self.config.model)
        self.engine = build_engine(self.model, self.ds_config, train.weight_decay, train.compile)
        dp_rank, dp_size = data_parallel_position(self.engine)
        self.data = TrainingData(self.config.data, train.seq_len, train.seed, dp_rank, dp_size)
        self.tokens_per_step = train.micro_batch_size * train.grad_accum_steps * dp_size * train.seq_len
        self.flops_per_token = self.model.flops_per_token(train.seq_len)
        self.step = 0

    def resume(self) -> None:
        tag = checkpoint.latest_tag(self.config.run.dir)
        if tag is None:
            return
        state = checkpoint.load(self.engine, self.config.run.dir, tag)
        self.step = int(state["step"])
        if distributed.is_main():
            print(f"resumed from {checkpoint.checkpoints_dir(self.config.run.dir) / tag} at step {self.step}", flush=True)

    def _to_device(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.info.device.type == "cuda":
            batch = batch.pin_memory().to(self.info.device, non_blocking=True)
        return batch[:, :-1], batch[:, 1:]

    def train_step(self) -> torch.Tensor:
        """One optimizer step over grad_accum_steps micro-batches; returns the mean loss (on device)."""
        from pretrain.engine import optimizer_step

        train = self.config.train
        batches = (self._to_device(self.data.train_batch(self.step, m, train)) for m in range(train.grad_accum_steps))
        loss = optimizer_step(self.engine, batches)
        self.step += 1
        return loss

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if not self.data.has_valid:
            return None
        from pretrain.engine import evaluation_loss

        self.engine.eval()
        total = torch.zeros((), device=self.info.device)
        for batch_index in range(self.config.train.eval_batches):
            inputs, targets = self._to_device(self.data.valid_batch(batch_index, self.config.train))
            total += evaluation_loss(self.engine, inputs, targets)
        self.engine.train()
        return float(distributed.all_reduce_mean(total / self.config.train.eval_batches))

    def save(self) -> None:
        client_state = {"step": self.step, "seed": self.config.train.seed, "world_size": self.info.world_size}
        checkpoint.save(self.engine, self.config.run.dir, self.step, client_state, self.config.train.keep_last)

    def run(self) -> dict[str, Any]:
        cfg, train = self.config, self.config.train
        main = distributed.is_main()
        if main:
            save_config(cfg, cfg.run.dir / "config.yaml")
        metrics = MetricsWriter(cfg.run.dir, main, cfg.run.tensorboard, self.step)
        bar = None
        if main and cfg.run.progress_bar:
            from tqdm import tqdm

            bar = tqdm(total=train.max_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        last: dict[str, Any] = {}
        interval_loss, interval_steps, clock = torch.zeros((), device=self.info.device), 0, time.perf_counter()
        while self.step < train.max_steps:
            interval_loss += self.train_step()
            interval_steps += 1
            if bar is not None:
                bar.update(1)
            if self.step % cfg.run.log_interval == 0 or self.step == train.max_steps:
                loss = float(distributed.all_reduce_mean(interval_loss / interval_steps))  # the only host sync
                elapsed = time.perf_counter() - clock
                last = self._log_record(loss, interval_steps, elapsed)
                metrics.write(last)
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{last['tokens_per_second']:.0f}")
                interval_loss.zero_()
                interval_steps, clock = 0, time.perf_counter()
            if (train.eval_interval and self.step % train.eval_interval == 0) or self.step == train.max_steps:
                val_loss = self.evaluate()
                if val_loss is not None:
                    last["val_loss"] = val_loss
                    metrics.write({"step": self.step, "val_loss": val_loss, "val_perplexity": _perplexity(val_loss)})
            if (train.save_interval and self.step % train.save_interval == 0) or self.step == train.max_steps:
                self.save()
            faults.after_step(self.step)
        if bar is not None:
            bar.close()
        metrics.close()
        return last

    def _log_record(self, loss: float, steps: int, elapsed: float) -> dict[str, Any]:
        tokens_per_second = self.tokens_per_step * steps / max(elapsed, 1e-9)
        grad_norm = self.engine.get_global_grad_norm()
        record = {
            "step": self.step,
            "loss": loss,
            "lr": float(self.engine.get_lr()[0]),
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "tokens": self.step * self.tokens_per_step,
            "tokens_per_second": tokens_per_second,
            "mfu": model_flops_utilisation(tokens_per_second, self.flops_per_token, self.info.device, self.info.world_size),
            "memory_gb": memory_gb(self.info.device),
        }
        if precision_of(self.ds_config) == "fp16":
            record["loss_scale"] = float(self.engine.optimizer.cur_scale)
        return record


def _perplexity(loss: float) -> float:
    import math

    return math.exp(min(loss, 50.0))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    config = load_pretrain_config(args.config, args.set)
    run = prepare(config, launcher_world_size())
    info = distributed.init_distributed()
    if info.world_size != launcher_world_size():  # MPI discovery can learn the size only now
        run = prepare(config, info.world_size)
    try:
        trainer = Trainer(run, info)
        trainer.resume()
        if distributed.is_main():
            cfg = run.config
            print(
                f"training {cfg.model.arch} ({trainer.model.num_params() / 1e6:.2f}M params) on {info.world_size} "
                f"rank(s), {info.device.type}, ZeRO-{zero_stage_of(run.ds_config)}, {precision_of(run.ds_config)}, "
                f"run dir {cfg.run.dir}",
                flush=True,
            )
        last = trainer.run()
        if distributed.is_main() and last:
            summary = ", ".join(f"{k}={v:.4g}" for k, v in last.items() if isinstance(v, float))
            print(f"done at step {trainer.step}: {summary}", flush=True)
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
