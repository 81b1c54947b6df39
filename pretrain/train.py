"""Pretraining: `lmforge train --config tiny --set train.max_steps=100`.

Also runs as `python -m pretrain.train`, `torchrun ... -m pretrain.train`, `deepspeed
pretrain/train.py` and `mpirun ... python -m pretrain.train`. Reads top to bottom: arguments and
config checks (all before any process group exists), data, model, engine, resume, the loop.
Rerunning the same command with the same run.dir resumes from its latest checkpoint; SIGTERM or
SIGUSR1 saves one at the next step boundary and exits 0 (docs/reliability.md).
"""
from __future__ import annotations

import argparse
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from lmforge import distributed, ownership, run_lock
from lmforge.config import save_config
from lmforge.distributed import launcher_world_size
from lmforge.errors import run_cli
from lmforge.run_layout import config_path
from numerics.float8 import convert_to_float8, float8_recipe
from parallel.experts import apply_expert_parallel
from pretrain import checkpoint, console, faults, resume, run_checks
from pretrain.config import PretrainConfig, load_pretrain_config
from pretrain.ds_config import checkpoint_writer_of, guards_on_device, precision_of, with_universal_loading, zero_stage_of
from pretrain.guarded_step import GuardedStep, PendingStep
from pretrain.metrics import MetricsWriter, memory_gb, model_flops_utilisation, router_load_metrics
from pretrain.model import load_balancing_loss
from pretrain.pipeline import data_parallel_size, pipeline_metrics
from pretrain.preemption import PreemptionSignals
from pretrain.rank_batches import BatchPrefetcher, TrainingData, document_segment_ids


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lmforge train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny", help="preset name in configs/ or a YAML path (default: tiny)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    parser.add_argument("--resume-fallback", action="store_true",
                        help="if the latest checkpoint is damaged, resume from the previous intact one (run.resume_fallback)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return parser.parse_args(argv)


@dataclass(frozen=True)
class PreparedRun:
    """A config whose every input was checked, plus DeepSpeed's merged JSON."""

    config: PretrainConfig
    ds_config: dict[str, Any]
    notes: tuple[str, ...] = ()
    """Lines for the start of the run (not errors), from run_checks."""
    params: int | None = None
    """The model's parameter count, as run_checks counted it for the checkpoints' disk space (None: not counted)."""


def prepare(config: PretrainConfig, world_size: int, verify_checksums: bool = True) -> PreparedRun:
    """Runs the one set of launch checks (`pretrain.run_checks.check_launch`, as `lmforge preflight` does):
    every problem is one line of one LmforgeError; only then is run.dir created."""
    found = run_checks.check_launch(config, world_size, verify_checksums)
    found.raise_problems()
    run_checks.check_run_dir(found.config.run.dir)
    ownership.claim(found.config.run.dir, "run", "train")
    return PreparedRun(found.config, found.ds_config, tuple(found.notes), found.params)


class Trainer:
    def __init__(self, run: PreparedRun, info: distributed.DistributedInfo):
        from pretrain.engine import build_engine, build_model, data_parallel_position, start_compile_workers

        self.config, self.ds_config, self.info = run.config, run.ds_config, info
        train = self.config.train
        # Chosen and checked before the engine exists: another number of ranks needs universal loading.
        self.resume_point = resume.plan(self.config, data_parallel_size(self.config.parallel, info.world_size),
                                        zero_stage_of(self.ds_config))
        ds_config = self.ds_config
        if self.resume_point is not None and self.resume_point.load_dir is not None:
            ds_config = with_universal_loading(ds_config)
        torch.manual_seed(train.seed)
        if train.compile and info.device.type == "cuda":
            start_compile_workers()  # they import torch while the model and the engine are built
        # adamw8bit (bf16 weights, for models too large for fp32 states): built on the GPU also under zero.Init.
        with torch.device(info.device) if train.optimizer == "adamw8bit" and info.device.type == "cuda" else nullcontext():
            self.model = build_model(self.config.model, ds_config, info.device)
        mpu = None
        if self.config.parallel.sequence > 1:
            from parallel.sequence import apply_sequence_parallel

            mpu = apply_sequence_parallel(self.model, self.config.parallel.sequence)
        if self.config.parallel.expert > 1:  # experts sharded by DeepSpeed's MoE layers (parallel/experts.py)
            apply_expert_parallel(self.model.blocks, self.config.parallel.expert, load_balancing_loss)
        recipe = float8_recipe(train.float8, info.device)
        if recipe != "off":
            convert_to_float8(self.model, recipe)
        on_device = guards_on_device(ds_config)
        self.engine = build_engine(self.model, ds_config, train.weight_decay, train.compile, train.decay_embeddings,
                                   guard_clips=on_device, compile_scope=train.compile_scope, mpu=mpu,
                                   compile_mode=train.compile_mode, optimizer=train.optimizer)
        dp_rank, dp_size = data_parallel_position(self.engine)
        self.data = TrainingData(self.config.data, train.seq_len, train.seed, dp_rank, dp_size)
        self.global_batch = train.micro_batch_size * train.grad_accum_steps * dp_size
        self.tokens_per_step = self.global_batch * train.seq_len
        self.flops_per_token = self.model.flops_per_token(train.seq_len)
        self.guarded = GuardedStep(self.engine, train.max_bad_steps, _loss_scale(self.engine) is not None,
                                   on_device=on_device, grad_clip=train.grad_clip)
        self.batches: BatchPrefetcher | None = None
        self.step = 0
        self.saved_step: int | None = None

    def resume(self) -> None:
        point = self.resume_point
        if point is None:
            return
        groups = None
        if point.from_zero0:
            from pretrain.engine import parameter_groups

            train = self.config.train
            groups = [group["params"] for group in parameter_groups(self.model, train.weight_decay, train.decay_embeddings)]
        state = checkpoint.load(self.engine, self.config.run.dir, point.tag, point.load_dir, zero0_groups=groups)
        self.step = self.saved_step = int(state["step"])
        if distributed.is_main():
            record = point.record
            how = "" if point.load_dir is None else f" (saved on {record['data_parallel_size']} data-parallel ranks, loaded through {point.load_dir})"
            how += f" (ZeRO-0's checkpoint, loaded into ZeRO-{zero_stage_of(self.ds_config)})" if point.from_zero0 else ""
            print(f"resumed from {checkpoint.checkpoints_dir(self.config.run.dir) / point.tag} at step {self.step}{how}", flush=True)
            if record.get("global_batch", self.global_batch) != self.global_batch:
                print(f"note: global batch {self.global_batch} differs from the checkpoint's {record['global_batch']}: "
                      "later steps read other samples than the original run would have", flush=True)

    def _to_device(self, batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(inputs, targets), and the document ids with data.document_masking (rank_batches.document_segment_ids)."""
        if self.info.device.type == "cuda":
            batch = (batch if batch.is_pinned() else batch.pin_memory()).to(self.info.device, non_blocking=True)
        if self.data.document_eod is not None:
            return batch[:, :-1], batch[:, 1:], document_segment_ids(batch[:, :-1], self.data.document_eod)
        return batch[:, :-1], batch[:, 1:]

    def train_step(self, stop_requested: bool = False) -> PendingStep:
        """Queues one optimizer step over grad_accum_steps micro-batches (skipped on the device if a
        loss or gradient is not finite); `self.guarded.settle()` gives its outcome."""
        train = self.config.train
        if self.batches is None:
            self.batches = BatchPrefetcher(self.data, train, self.step, pin_memory=self.info.device.type == "cuda")
        step = self.step
        micro_batches = (self._to_device(self.batches.next(step, m)) for m in range(train.grad_accum_steps))
        pending = self.guarded.step(micro_batches, step + 1, stop_requested)
        self.step += 1
        return pending

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if not self.data.has_valid:
            return None
        from pretrain.engine import evaluation_loss

        self.engine.eval()
        total = torch.zeros((), device=self.info.device)
        for batch_index in range(self.config.train.eval_batches):
            total += evaluation_loss(self.engine, *self._to_device(self.data.valid_batch(batch_index, self.config.train)))
        self.engine.train()
        return float(distributed.all_reduce_mean(total / self.config.train.eval_batches))

    def save(self) -> str:
        client_state = {"step": self.step, "seed": self.config.train.seed, "world_size": self.info.world_size}
        tag = checkpoint.save(self.engine, self.config.run.dir, self.step, client_state, self.config.train.keep_last,
                              resume.record_for(self.config, self.global_batch),
                              checkpoint_writer_of(self.config.train.checkpoint_writer, self.ds_config))
        self.saved_step = self.step
        return tag

    def _resume_hint(self) -> str:
        checkpoint.settle_pending_save(self.engine)  # a write in flight is the checkpoint the rerun will resume from
        tags = checkpoint.complete_tags(self.config.run.dir)
        where = f"from {checkpoint.checkpoints_dir(self.config.run.dir) / tags[-1]}" if tags else "from the start"
        return f"lower train.lr or check the data, then rerun the same command to resume {where}"

    def run(self, signals: PreemptionSignals | None = None) -> dict[str, Any]:
        """Trains to train.max_steps, or to the step boundary after a preemption signal (then `stopped_by` is set)."""
        cfg, train = self.config, self.config.train
        main = distributed.is_main()
        if main:
            save_config(cfg, config_path(cfg.run.dir))
        metrics = MetricsWriter(cfg.run.dir, main, cfg.run.tensorboard, self.step)
        self.stopped_by: str | None = None
        bar = None
        if main and cfg.run.progress_bar:
            from tqdm import tqdm

            bar = tqdm(total=train.max_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        last: dict[str, Any] = {}
        device = self.info.device
        interval_loss, interval_applied = torch.zeros((), device=device), torch.zeros((), device=device)
        interval_steps, clock, stop = 0, time.perf_counter(), False
        try:
            while self.step < train.max_steps:
                pending = self.train_step(signals is not None and signals.requested)
                interval_steps += 1
                # Accumulated on the device: nothing in a step waits for the GPU.
                interval_loss += torch.where(pending.skipped, 0.0, pending.loss)
                interval_applied += (~pending.skipped).float()
                if bar is not None:
                    bar.update(1)
                step = self.step
                log_now = step % cfg.run.log_interval == 0 or step == train.max_steps
                eval_now = (train.eval_interval and step % train.eval_interval == 0) or step == train.max_steps
                save_now = (train.save_interval and step % train.save_interval == 0) or step == train.max_steps
                # The host reads each step's flags one step late, and all of them where it waits anyway.
                settled = self.guarded.settle(keep_last=not (log_now or eval_now or save_now))
                stop = stop or any(outcome.stop for _, outcome in settled)
                if stop:
                    settled += self.guarded.settle()
                if log_now:
                    loss = float(distributed.all_reduce_mean(interval_loss / interval_applied))  # NaN if none applied
                    last = self._log_record(loss, interval_steps, time.perf_counter() - clock)
                    metrics.write(last)
                    if bar is not None:
                        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{last['tokens_per_second']:.0f}")
                    interval_loss.zero_()
                    interval_applied.zero_()
                    interval_steps, clock = 0, time.perf_counter()
                for number, outcome in settled:
                    self.guarded.check(outcome, number, self._resume_hint)
                if eval_now:
                    val_loss = self.evaluate()
                    if val_loss is not None:
                        last["val_loss"] = val_loss
                        metrics.write({"step": step, "val_loss": val_loss, "val_perplexity": _perplexity(val_loss)})
                if save_now:
                    self.save()
                if stop and step < train.max_steps:
                    if self.saved_step != step:
                        self.save()
                    self.stopped_by = (signals.received if signals else None) or "a signal to another rank"
                    break
                faults.after_step(step)
            checkpoint.finish_pending_save(self.engine)  # the last save's files, COMPLETE and latest are on disk
        finally:
            checkpoint.settle_pending_save(self.engine)  # stopped by an error: the save before it still completes
            if self.batches is not None:
                self.batches.close()
                self.batches = None
            if bar is not None:
                bar.close()
            metrics.close()
        return last

    def _log_record(self, loss: float, steps: int, elapsed: float) -> dict[str, Any]:
        tokens_per_second = self.tokens_per_step * steps / max(elapsed, 1e-9)
        grad_norm = self.guarded.last_grad_norm
        if grad_norm is None:
            grad_norm = self.engine.get_global_grad_norm()
        record = {
            **pipeline_metrics(self.ds_config),
            "step": self.step,
            "loss": loss,
            "lr": self.guarded.last_lr if self.guarded.last_lr is not None else float(self.engine.get_lr()[0]),
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "tokens": self.step * self.tokens_per_step,
            "tokens_per_second": tokens_per_second,
            "mfu": model_flops_utilisation(tokens_per_second, self.flops_per_token, self.info.device, self.info.world_size),
            "memory_gb": memory_gb(self.info.device),
            "skipped_steps": int(self.engine.skipped_steps),
            **router_load_metrics(self.model.blocks),
        }
        loss_scale = _loss_scale(self.engine)
        if loss_scale is not None:
            record["loss_scale"] = loss_scale
        return record


def _loss_scale(engine) -> float | None:
    """The dynamic loss scale: DeepSpeed's fp16 optimizers', or torch's GradScaler's (fp16 autocast, ZeRO-0)."""
    if getattr(engine, "torch_autocast_z0_gradscaler", None) is not None:
        return float(engine.torch_autocast_z0_gradscaler.get_scale())
    if engine.fp16_enabled():
        return float(engine.optimizer.loss_scale)  # a property of all three DeepSpeed fp16 optimizers
    return None


def _perplexity(loss: float) -> float:
    import math

    return math.exp(min(loss, 50.0))


def _progress(message: str) -> None:
    """A line on rank 0 saying what the next seconds are spent on."""
    if (distributed.rank() if distributed.is_initialized() else distributed.launcher_rank()) == 0:
        print(f"lmforge train: {message}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    _progress("checking the config, data and DeepSpeed JSON")
    config = load_pretrain_config(args.config, args.set + (["run.resume_fallback=true"] if args.resume_fallback else []))
    run = prepare(config, launcher_world_size())
    signals = PreemptionSignals().install()
    info = distributed.init_distributed("train")
    if info.world_size != launcher_world_size():  # MPI discovery can learn the size only now
        run = prepare(config, info.world_size)
    console.keep_deepspeed_warnings_in(run.config.run.dir / console.DEEPSPEED_LOG, distributed.is_main())
    try:
        _progress(f"building the model and the DeepSpeed engine (ZeRO-{zero_stage_of(run.ds_config)})")
        run_lock.acquire_on_main(run.config.run.dir, distributed.is_main(), distributed.broadcast_object)
        trainer = Trainer(run, info)
        trainer.resume()
        if trainer.step >= run.config.train.max_steps:
            if distributed.is_main():
                print(f"nothing to do: {run.config.run.dir} already at step {trainer.step} ≥ train.max_steps = "
                      f"{run.config.train.max_steps}", flush=True)
            return 0
        if distributed.is_main():
            cfg = run.config
            count = run.params if run.params is not None else run_checks.parameter_count(cfg.model)
            params = f"{count / 1e6:.2f}M params"
            if cfg.model.n_experts:
                params += f", {trainer.model.active_params() / 1e6:.2f}M active"
            recipe = float8_recipe(cfg.train.float8, info.device)
            print(
                f"training {cfg.model.arch} ({params}) on {info.world_size} "
                f"rank(s), {info.device.type}, ZeRO-{zero_stage_of(run.ds_config)}, {precision_of(run.ds_config)}"
                f"{'' if recipe == 'off' else ', float8 ' + recipe}, "
                f"run dir {cfg.run.dir}",
                flush=True,
            )
            for note in run.notes:
                print(f"note: {note}", flush=True)
            if run.config.train.compile and info.device.type == "cuda":
                _progress("the first step compiles the model (torch.compile): expect tens of seconds before the next line")
        last = trainer.run(signals)
        if distributed.is_main() and trainer.stopped_by:
            tag = checkpoint.tag_for_step(trainer.step)
            print(f"preempted by {trainer.stopped_by}: saved {checkpoint.checkpoints_dir(run.config.run.dir) / tag} "
                  f"at step {trainer.step}; rerun the same command to resume", flush=True)
        elif distributed.is_main() and last:
            summary = ", ".join(f"{k}={v:.4g}" for k, v in last.items() if isinstance(v, float))
            print(f"done at step {trainer.step}: {summary}", flush=True)
    finally:
        signals.restore()
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    distributed.exit_process(run_cli(main))
