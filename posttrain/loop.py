"""The optimisation loop SFT, the reward model and DPO share: micro-batches, logging, evaluation,
checkpoints and resume. Each verb supplies the loss of one micro-batch and an evaluation.

Rerunning a command with the same run.dir resumes from its latest checkpoint (the data order is a
function of the seed and step, batches.ExampleOrder).
"""
from __future__ import annotations

import time
from typing import Any, Callable

import torch

from lmforge import distributed
from lmforge.errors import LmforgeError
from posttrain.job import Job, save_run_files
from pretrain import checkpoint
from pretrain.metrics import MetricsWriter, memory_gb

MicroLoss = Callable[[int, int], tuple[torch.Tensor, dict[str, torch.Tensor]]]
"""(step, micro) -> (loss to backpropagate, detached statistics to log)."""


def mean_over_ranks(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """One all-reduce for a dict of scalar tensors."""
    if not values:
        return {}
    keys = list(values)
    stacked = distributed.all_reduce_mean(torch.stack([values[k].detach().float().reshape(()) for k in keys]))
    return {k: float(v) for k, v in zip(keys, stacked.tolist())}


def weighted_mean_over_ranks(sums: dict[str, torch.Tensor], weight: torch.Tensor) -> dict[str, float]:
    """Sums over every rank divided by the total weight (means over all evaluated examples)."""
    reduced = mean_over_ranks({**sums, "__weight": weight})
    total = reduced.pop("__weight")
    return {k: v / max(total, 1e-12) for k, v in reduced.items()}


def resume(engine, run_dir, expect: str, fallback: bool = False) -> int:
    """Loads RUN_DIR's latest checkpoint into `engine`, checked against its record's checksums as
    pretraining does (pretrain.resume.choose_tag; `fallback`: run.resume_fallback); returns its step
    (0 for a fresh run)."""
    from pretrain.resume import choose_tag

    tag = choose_tag(run_dir, fallback)
    if tag is None:
        return 0
    state = checkpoint.load(engine, run_dir, tag)
    if state.get("verb", expect) != expect:
        raise LmforgeError(f"run.dir = {run_dir}: holds a '{state.get('verb')}' run, not '{expect}'; use another run.dir")
    if distributed.is_main():
        print(f"resumed from {checkpoint.checkpoints_dir(run_dir) / tag} at step {state['step']}", flush=True)
    return int(state["step"])


class SupervisedLoop:
    """Steps one DeepSpeed engine to train.max_steps, logging to RUN_DIR/metrics.jsonl."""

    def __init__(self, job: Job, engine, verb: str):
        self.job, self.engine, self.verb = job, engine, verb
        self.device = engine.device
        self.step = resume(engine, job.config.run.dir, verb, job.config.run.resume_fallback)

    def save(self) -> None:
        train = self.job.config.train
        state = {"step": self.step, "verb": self.verb, "seed": train.seed, "world_size": distributed.world_size()}
        checkpoint.save(self.engine, self.job.config.run.dir, self.step, state, train.keep_last, {"verb": self.verb})

    def run(self, micro_loss: MicroLoss, evaluate: Callable[[], dict[str, float]] | None) -> dict[str, Any]:
        cfg, train = self.job.config, self.job.config.train
        main = distributed.is_main()
        save_run_files(self.job, main)
        metrics = MetricsWriter(cfg.run.dir, main, cfg.run.tensorboard, self.step)
        bar = None
        if main and cfg.run.progress_bar:
            from tqdm import tqdm

            bar = tqdm(total=train.max_steps, initial=self.step, desc=self.verb, unit="step", dynamic_ncols=True)
        last: dict[str, Any] = {}
        interval: dict[str, torch.Tensor] = {}
        interval_steps, clock = 0, time.perf_counter()
        self.engine.train()
        while self.step < train.max_steps:
            for micro in range(train.grad_accum_steps):
                loss, stats = micro_loss(self.step, micro)
                self.engine.backward(loss)
                self.engine.step()
                for key, value in {"loss": loss.detach().float(), **stats}.items():
                    interval[key] = interval.get(key, 0.0) + value.detach().float() / train.grad_accum_steps
            self.step += 1
            interval_steps += 1
            if bar is not None:
                bar.update(1)
            if self.step % cfg.run.log_interval == 0 or self.step == train.max_steps:
                record = mean_over_ranks({k: v / interval_steps for k, v in interval.items()})
                grad_norm = self.engine.get_global_grad_norm()
                last = {"step": self.step, **record, "lr": float(self.engine.get_lr()[0]),
                        "grad_norm": None if grad_norm is None else float(grad_norm),
                        "seconds_per_step": (time.perf_counter() - clock) / interval_steps,
                        "memory_gb": memory_gb(self.device)}
                metrics.write(last)
                if bar is not None:
                    bar.set_postfix(loss=f"{record['loss']:.4f}")
                interval, interval_steps, clock = {}, 0, time.perf_counter()
            if evaluate is not None and ((train.eval_interval and self.step % train.eval_interval == 0)
                                         or self.step == train.max_steps):
                self.engine.eval()
                with torch.no_grad():
                    scores = {f"val_{k}": v for k, v in evaluate().items()}
                self.engine.train()
                if scores:
                    metrics.write({"step": self.step, **scores})
                    last.update(scores)
            if (train.save_interval and self.step % train.save_interval == 0) or self.step == train.max_steps:
                self.save()
        if bar is not None:
            bar.close()
        metrics.close()
        return last


def print_summary(verb: str, step: int, last: dict[str, Any]) -> None:
    if distributed.is_main() and last:
        summary = ", ".join(f"{k}={v:.4g}" for k, v in last.items() if isinstance(v, float) and k != "memory_gb")
        print(f"{verb} done at step {step}: {summary}", flush=True)


def run_rollout_iterations(trainer, verb: str, iterate: Callable[[], tuple[dict[str, float], dict[str, Any]]]) -> dict[str, Any]:
    """The outer loop of a rollout verb (ppo, grpo) to train.max_steps iterations: run files, metrics,
    progress bar, checkpoints. `iterate()` runs one iteration and returns (its record, averaged over
    ranks, and the extra fields to log with it); `trainer` has config, job, info, step, actor, save()."""
    cfg = trainer.config
    main = distributed.is_main()
    save_run_files(trainer.job, main)
    metrics = MetricsWriter(cfg.run.dir, main, cfg.run.tensorboard, trainer.step)
    bar = None
    if main and cfg.run.progress_bar:
        from tqdm import tqdm

        bar = tqdm(total=cfg.train.max_steps, initial=trainer.step, desc=verb, unit="iter", dynamic_ncols=True)
    last: dict[str, Any] = {}
    while trainer.step < cfg.train.max_steps:
        clock = time.perf_counter()
        record, extra = iterate()
        trainer.step += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(reward=f"{record['reward']:.3f}", kl=f"{record['kl']:.3f}")
        if trainer.step % cfg.run.log_interval == 0 or trainer.step == cfg.train.max_steps:
            last = {"step": trainer.step, **record, **extra, "lr": float(trainer.actor.get_lr()[0]),
                    "seconds": time.perf_counter() - clock, "memory_gb": memory_gb(trainer.info.device)}
            metrics.write(last)
        if (cfg.train.save_interval and trainer.step % cfg.train.save_interval == 0) or trainer.step == cfg.train.max_steps:
            trainer.save()
    if bar is not None:
        bar.close()
    metrics.close()
    return last
